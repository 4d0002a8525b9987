"""The client library's Subscriber and publishing against a real broker process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.e2e.servers import Stack, embedded_stack
from turtlemq_client import BadEmail, Connection, Message, Subscriber, UnknownTopic, list_topics, publish

from .test_client_tasks import eventually

pytestmark = pytest.mark.e2e

STARTER_TOPICS = ["Django", "NodeJs", "React", "SpringBoot"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with embedded_stack(tmp_path_factory.mktemp("client-topics")) as running:
        yield running


async def test_list_topics_returns_the_topic_names_sorted(broker):
    names = await list_topics(broker.client_url)
    assert names == sorted(names)
    assert set(STARTER_TOPICS) <= set(names)


async def test_a_subscriber_gets_each_message_of_the_topics_it_follows_in_order_and_no_other(broker):
    async with Subscriber(broker.client_url, ["React", "Django"]) as subscriber:
        assert subscriber.contents["React"].startswith("React")  # the topic's description comes first
        published = []
        for topic, data in [("React", "r1"), ("NodeJs", "n1"), ("Django", "d1"), ("React", "r2")]:
            published.append(Message(topic, await publish(broker.client_url, topic, data), data))
        received = [await subscriber.next_message(15) for _ in range(3)]
    assert received == [m for m in published if m.topic != "NodeJs"]


async def test_a_pattern_follows_every_topic_it_matches(broker):
    async with Subscriber(broker.client_url, "#") as everything, Connection(broker.client_url) as publisher:
        ids = {topic: await publisher.publish(topic, f"to {topic}") for topic in STARTER_TOPICS}
        received = {(await everything.next_message(15)).topic for _ in STARTER_TOPICS}
    assert received == set(ids)


async def test_subscribing_with_since_replays_the_stored_messages_after_it_then_goes_live(broker):
    first = await publish(broker.client_url, "SpringBoot", "s1")
    await publish(broker.client_url, "SpringBoot", "s2")
    await publish(broker.client_url, "SpringBoot", "s3")
    async with Subscriber(broker.client_url, "SpringBoot", since=first) as subscriber:
        live = await publish(broker.client_url, "SpringBoot", "s4")
        received = [await subscriber.next_message(15) for _ in range(3)]
    assert [(m.id, m.data) for m in received] == [(first + 1, "s2"), (first + 2, "s3"), (live, "s4")]


async def test_an_unsubscribed_topic_sends_nothing_more(broker):
    async with Subscriber(broker.client_url, ["NodeJs", "Django"]) as subscriber:
        await subscriber.unsubscribe("NodeJs")
        assert subscriber.patterns == ["Django"]
        await subscriber.publish("NodeJs", "not for us")
        after = await subscriber.publish("Django", "for us")
        assert await subscriber.next_message(15) == Message("Django", after, "for us")


async def test_unknown_topics_and_malformed_addresses_raise_typed_errors(broker):
    with pytest.raises(UnknownTopic) as unknown:
        await Subscriber(broker.client_url, "NoSuchTopic").start()
    assert unknown.value.ref == {"type": "SUBSCRIBE", "topic": "NoSuchTopic"}
    with pytest.raises(UnknownTopic):
        await publish(broker.client_url, "NoSuchTopic", "x")
    async with Subscriber(broker.client_url) as subscriber:
        with pytest.raises(BadEmail):
            await subscriber.subscribe("React", email="not-an-address")
        assert subscriber.patterns == []
        # The connection stays usable after an ERROR.
        assert (await subscriber.subscribe("React")).startswith("React")


async def test_iterating_a_subscriber_ends_when_it_is_closed(broker):
    subscriber = await Subscriber(broker.client_url, "Django").start()

    async def consume() -> list[Message]:
        return [message async for message in subscriber]

    consumer = asyncio.create_task(consume())
    sent = await publish(broker.client_url, "Django", "last one")
    await eventually(lambda: subscriber.last_ids.get("Django") == sent, "the message to reach the subscriber")
    await subscriber.close()
    assert [m.data for m in await asyncio.wait_for(consumer, 10)] == ["last one"]
