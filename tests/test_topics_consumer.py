"""Topic frames through the consumer, in-process: LIST_TOPICS, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, MESSAGE.

Where a test must show that a frame does *not* arrive, it publishes a marker
message on a topic the peer does follow afterwards and checks that the marker
is the next frame: layer events to one connection arrive in the order they
were sent, so anything wrongly delivered would have come first.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connections

from subscriptions import consumers as topic_consumers
from subscriptions import events, topics
from subscriptions.models import Message, Subscription
from turtlemq_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0


class TopicPeer:
    """One in-process WebSocket connection speaking the topic frames."""

    def __init__(self, communicator: WebsocketCommunicator, name: str) -> None:
        self.communicator = communicator
        self.name = name

    async def send(self, frame: Any) -> None:
        await self.communicator.send_to(text_data=json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        output = await self.communicator.receive_output(TIMEOUT)
        assert output["type"] == "websocket.send", f"{self.name} expected a frame, got {output}"
        return json.loads(output["text"])

    async def expect(self, frame_type: str) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == frame_type, f"{self.name} expected {frame_type}, got {frame}"
        return frame

    async def expect_error(self, code: str, ref: dict[str, Any]) -> dict[str, Any]:
        frame = await self.expect("ERROR")
        assert frame["code"] == code, frame
        assert frame["ref"] == ref, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
        return frame

    async def subscribe(self, topic: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "SUBSCRIBE", "topic": topic, **extra})
        frame = await self.expect("SUBSCRIBED")
        assert frame["topic"] == topic, frame
        return frame

    async def unsubscribe(self, topic: str, **extra: Any) -> None:
        await self.send({"type": "UNSUBSCRIBE", "topic": topic, **extra})
        assert await self.recv() == {"type": "UNSUBSCRIBED", "topic": topic}

    async def publish(self, topic: str, data: str) -> int:
        await self.send({"type": "PUBLISH", "topic": topic, "data": data})
        frame = await self.expect("PUBLISHED")
        assert frame["topic"] == topic, frame
        return frame["id"]

    async def messages(self, count: int) -> list[tuple[str, int, str]]:
        """The next ``count`` frames, which must be MESSAGEs, as (topic, id, data)."""
        received = []
        for _ in range(count):
            frame = await self.expect("MESSAGE")
            received.append((frame["topic"], frame["id"], frame["data"]))
        return received


@pytest.fixture
async def connect():
    # A channel layer of its own for each test (and so for each event loop):
    # channels-redis keeps receive state that is bound to the loop it ran in.
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    opened: list[WebsocketCommunicator] = []

    async def open_peer(path: str = "/") -> TopicPeer:
        communicator = WebsocketCommunicator(application, path)
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        opened.append(communicator)
        return TopicPeer(communicator, f"peer{len(opened)}")

    yield open_peer
    await close_all(opened)


async def close_all(opened: list[WebsocketCommunicator]) -> None:
    """Disconnect every peer at once, with a short timeout, then close this test's database connections.

    On the Redis layer, a consumer cancelled while channels-redis opens a Redis
    connection for its receive can swallow the cancellation and wait on in
    BZPOPMIN until ``disconnect`` gives up on it; waiting for each in turn
    would cost seconds per peer. Database connections opened for this test
    would keep the test database from being dropped at the end.
    """
    await asyncio.gather(
        *(communicator.disconnect(timeout=CLOSE_TIMEOUT) for communicator in opened if not communicator.future.done())
    )
    await database_sync_to_async(connections.close_all)()


create_topic = database_sync_to_async(topics.create_topic)
publish_quietly = database_sync_to_async(topics.publish)  # stored, but no layer event


async def make_topics(*names: str, description: str = "") -> dict[str, topics.TopicRef]:
    return {name: await create_topic(name, description or f"about {name}") for name in names}


@database_sync_to_async
def stored_messages(name: str) -> list[tuple[int, str]]:
    return list(Message.objects.filter(topic__name=name).order_by("seq").values_list("seq", "data"))


@database_sync_to_async
def email_subscriptions(name: str) -> list[tuple[str, bool]]:
    return list(Subscription.objects.filter(topic__name=name).values_list("address", "active"))


# --- LIST_TOPICS -------------------------------------------------------------------------


async def test_list_topics_answers_with_every_topic_name_sorted(connect):
    await make_topics("zeta", "alpha.beta", "Alpha", "alpha")
    peer = await connect()
    await peer.send({"type": "LIST_TOPICS"})
    frame = await peer.expect("TOPICS")
    assert frame["data"] == sorted(frame["data"])
    assert [name for name in frame["data"] if name.lower().startswith(("alpha", "zeta"))] == [
        "Alpha",
        "alpha",
        "alpha.beta",
        "zeta",
    ]


async def test_topic_frames_need_no_registration_and_work_at_both_paths(connect):
    await make_topics("paths")
    subscriber = await connect("/ws/")
    await subscriber.subscribe("paths")
    publisher = await connect("/")
    await publisher.send({"type": "REGISTER_CLIENT", "data": ""})
    await publisher.expect("REGISTER_CLIENT")
    assert await publisher.publish("paths", "hello") == 1
    assert await subscriber.messages(1) == [("paths", 1, "hello")]


# --- SUBSCRIBE, content ----------------------------------------------------------------


async def test_subscribe_answers_with_the_description_followed_by_the_messages_one_a_line(connect):
    await make_topics("content", description="All about content")
    publisher = await connect()
    for data in ["first", "second", "third"]:
        await publisher.publish("content", data)
    subscriber = await connect()
    frame = await subscriber.subscribe("content")
    assert frame == {
        "type": "SUBSCRIBED",
        "topic": "content",
        "data": "All about content\nfirst\nsecond\nthird",
        "lastId": 3,  # where the topic stood: live messages follow from 4
    }


async def test_content_holds_only_the_configured_number_of_newest_messages(connect, settings):
    settings.TURTLEMQ_TOPIC_CONTENT_MESSAGES = 2
    await make_topics("bounded", description="Bounded")
    publisher = await connect()
    for data in ["one", "two", "three", "four"]:
        await publisher.publish("bounded", data)
    frame = await (await connect()).subscribe("bounded")
    assert frame["data"] == "Bounded\nthree\nfour"
    assert len(await stored_messages("bounded")) == 4


async def test_subscribing_to_an_unknown_exact_topic_is_unknown_topic(connect):
    peer = await connect()
    await peer.send({"type": "SUBSCRIBE", "topic": "no.such.topic"})
    await peer.expect_error("UNKNOWN_TOPIC", {"type": "SUBSCRIBE", "topic": "no.such.topic"})
    await peer.send({"type": "LIST_TOPICS"})
    await peer.expect("TOPICS")  # the connection stays open


# --- PUBLISH, MESSAGE ----------------------------------------------------------------------


async def test_publish_answers_with_the_sequence_number_of_the_message_in_its_topic(connect):
    await make_topics("seq.a", "seq.b")
    publisher = await connect()
    assert [await publisher.publish("seq.a", "a1"), await publisher.publish("seq.a", "a2")] == [1, 2]
    assert await publisher.publish("seq.b", "b1") == 1
    assert await publisher.publish("seq.a", "a3") == 3
    assert await stored_messages("seq.a") == [(1, "a1"), (2, "a2"), (3, "a3")]


async def test_every_subscriber_of_a_topic_gets_its_messages_and_no_others(connect):
    await make_topics("fan.sports", "fan.weather")
    sports = [await connect() for _ in range(3)]
    for peer in sports:
        await peer.subscribe("fan.sports")
    weather = await connect()
    await weather.subscribe("fan.weather")
    publisher = await connect()
    await publisher.publish("fan.sports", "goal")
    await publisher.publish("fan.weather", "rain")
    for peer in sports:
        assert await peer.messages(1) == [("fan.sports", 1, "goal")]
    assert await weather.messages(1) == [("fan.weather", 1, "rain")]
    # The publisher follows nothing: its next frame answers its next request.
    await publisher.send({"type": "LIST_TOPICS"})
    await publisher.expect("TOPICS")


async def test_a_publisher_that_follows_its_topic_gets_its_own_message_too(connect):
    await make_topics("echo")
    peer = await connect()
    await peer.subscribe("echo")
    await peer.send({"type": "PUBLISH", "topic": "echo", "data": "me"})
    assert await peer.recv() == {"type": "PUBLISHED", "topic": "echo", "id": 1}
    assert await peer.recv() == {"type": "MESSAGE", "topic": "echo", "id": 1, "data": "me"}


async def test_a_burst_of_publishes_is_answered_in_order_with_an_error_in_its_place(connect, monkeypatch):
    await make_topics("burst.a", "burst.b")
    subscriber = await connect()
    await subscriber.subscribe("burst.a")
    transactions: list[int] = []

    def counting(messages: list[tuple[str, str]]) -> list[Any]:
        transactions.append(len(messages))
        return topics.publish_many(messages)

    monkeypatch.setattr(topic_consumers, "publish_many", database_sync_to_async(counting))
    publisher = await connect()
    sent = [("burst.a", f"a{n}") for n in range(100)]
    sent[50] = ("burst.nowhere", "lost")
    sent[70] = ("burst.b", "b1")
    for topic, data in sent:
        await publisher.send({"type": "PUBLISH", "topic": topic, "data": data})

    answers = [await publisher.recv() for _ in sent]
    expected_a = iter(range(1, 99))
    for (topic, _), answer in zip(sent, answers, strict=True):
        if topic == "burst.nowhere":
            assert (answer["type"], answer["code"], answer["ref"]["topic"]) == ("ERROR", "UNKNOWN_TOPIC", topic)
        elif topic == "burst.b":
            assert answer == {"type": "PUBLISHED", "topic": "burst.b", "id": 1}
        else:
            assert answer == {"type": "PUBLISHED", "topic": "burst.a", "id": next(expected_a)}
    a_data = [data for topic, data in sent if topic == "burst.a"]
    assert await subscriber.messages(98) == [("burst.a", n, data) for n, data in enumerate(a_data, 1)]
    assert sum(transactions) == len(sent)
    assert len(transactions) < len(sent)  # frames that queued together were stored together
    assert await stored_messages("burst.a") == list(enumerate(a_data, 1))


async def test_publishing_to_an_unknown_topic_is_unknown_topic_and_stores_nothing(connect):
    peer = await connect()
    await peer.send({"type": "PUBLISH", "topic": "nowhere", "data": "lost"})
    await peer.expect_error("UNKNOWN_TOPIC", {"type": "PUBLISH", "topic": "nowhere"})
    assert await database_sync_to_async(Message.objects.filter(data="lost").count)() == 0


@pytest.mark.parametrize(
    ("frame", "ref"),
    [
        ({"type": "PUBLISH", "data": "x"}, {"type": "PUBLISH"}),
        ({"type": "PUBLISH", "topic": 7, "data": "x"}, {"type": "PUBLISH", "topic": 7}),
        ({"type": "PUBLISH", "topic": "bad.frames"}, {"type": "PUBLISH", "topic": "bad.frames"}),
        ({"type": "PUBLISH", "topic": "bad.frames", "data": 5}, {"type": "PUBLISH", "topic": "bad.frames"}),
        ({"type": "PUBLISH", "topic": "bad.*", "data": "x"}, {"type": "PUBLISH", "topic": "bad.*"}),
        ({"type": "PUBLISH", "topic": "", "data": "x"}, {"type": "PUBLISH", "topic": ""}),
        ({"type": "SUBSCRIBE"}, {"type": "SUBSCRIBE"}),
        ({"type": "SUBSCRIBE", "topic": "bad..frames"}, {"type": "SUBSCRIBE", "topic": "bad..frames"}),
        ({"type": "SUBSCRIBE", "topic": "bad.fr*mes"}, {"type": "SUBSCRIBE", "topic": "bad.fr*mes"}),
        ({"type": "SUBSCRIBE", "topic": "bad.frames", "since": -1}, {"type": "SUBSCRIBE", "topic": "bad.frames"}),
        ({"type": "SUBSCRIBE", "topic": "bad.frames", "since": "3"}, {"type": "SUBSCRIBE", "topic": "bad.frames"}),
        ({"type": "SUBSCRIBE", "topic": "bad.frames", "email": 3}, {"type": "SUBSCRIBE", "topic": "bad.frames"}),
        ({"type": "SUBSCRIBE", "topic": "bad.*", "email": "a@example.com"}, {"type": "SUBSCRIBE", "topic": "bad.*"}),
        ({"type": "UNSUBSCRIBE", "topic": ["bad"]}, {"type": "UNSUBSCRIBE"}),
    ],
)
async def test_topic_frames_with_missing_or_wrong_fields_are_bad_frame(connect, frame, ref):
    await make_topics("bad.frames")
    peer = await connect()
    await peer.send(frame)
    await peer.expect_error("BAD_FRAME", ref)
    assert await stored_messages("bad.frames") == []


# --- UNSUBSCRIBE -----------------------------------------------------------------------------


async def test_after_unsubscribe_no_more_messages_of_that_topic_arrive(connect):
    await make_topics("leave.me", "leave.marker")
    subscriber = await connect()
    await subscriber.subscribe("leave.me")
    await subscriber.subscribe("leave.marker")
    await subscriber.unsubscribe("leave.me")
    publisher = await connect()
    await publisher.publish("leave.me", "unwanted")
    await publisher.publish("leave.marker", "marker")
    assert await subscriber.messages(1) == [("leave.marker", 1, "marker")]


async def test_unsubscribing_from_an_unknown_topic_is_unknown_topic(connect):
    peer = await connect()
    await peer.send({"type": "UNSUBSCRIBE", "topic": "never.was"})
    await peer.expect_error("UNKNOWN_TOPIC", {"type": "UNSUBSCRIBE", "topic": "never.was"})


async def test_unsubscribing_from_a_topic_not_followed_is_confirmed(connect):
    await make_topics("not.followed")
    await (await connect()).unsubscribe("not.followed")


# --- e-mail subscriptions --------------------------------------------------------------------


async def test_subscribe_with_email_registers_the_address_and_unsubscribe_with_email_removes_it(connect):
    await make_topics("mail.topic")
    peer = await connect()
    await peer.subscribe("mail.topic", email="Reader@Example.COM")
    assert await email_subscriptions("mail.topic") == [("Reader@example.com", True)]
    await peer.unsubscribe("mail.topic", email="Reader@example.com")
    assert await email_subscriptions("mail.topic") == [("Reader@example.com", False)]
    await peer.subscribe("mail.topic", email="Reader@example.com")  # subscribing again revives it
    assert await email_subscriptions("mail.topic") == [("Reader@example.com", True)]


@pytest.mark.parametrize("address", ["not-an-address", "a@", "@example.com", "a b@example.com", "a@example..com"])
async def test_subscribe_with_a_malformed_email_is_bad_email_and_registers_nothing(connect, address):
    await make_topics("mail.bad")
    peer = await connect()
    await peer.send({"type": "SUBSCRIBE", "topic": "mail.bad", "email": address})
    await peer.expect_error("BAD_EMAIL", {"type": "SUBSCRIBE", "topic": "mail.bad"})
    await peer.send({"type": "UNSUBSCRIBE", "topic": "mail.bad", "email": address})
    await peer.expect_error("BAD_EMAIL", {"type": "UNSUBSCRIBE", "topic": "mail.bad"})
    assert await email_subscriptions("mail.bad") == []


async def test_subscribing_an_email_to_an_unknown_topic_is_unknown_topic(connect):
    peer = await connect()
    await peer.send({"type": "SUBSCRIBE", "topic": "mail.nowhere", "email": "a@example.com"})
    await peer.expect_error("UNKNOWN_TOPIC", {"type": "SUBSCRIBE", "topic": "mail.nowhere"})


# --- patterns ------------------------------------------------------------------------------------


async def test_a_star_subscription_gets_messages_of_topics_exactly_one_word_below(connect):
    await make_topics("news", "news.sports", "news.weather", "news.sports.tennis", "other.sports")
    subscriber = await connect()
    assert await subscriber.subscribe("news.*") == {"type": "SUBSCRIBED", "topic": "news.*", "data": ""}
    publisher = await connect()
    for name in ["news", "news.sports.tennis", "other.sports", "news.sports", "news.weather"]:
        await publisher.publish(name, f"on {name}")
    assert await subscriber.messages(2) == [
        ("news.sports", 1, "on news.sports"),
        ("news.weather", 1, "on news.weather"),
    ]


async def test_a_hash_subscription_gets_messages_of_the_topic_and_every_topic_below(connect):
    await make_topics("feed", "feed.a", "feed.a.b", "feedback", "x.feed")
    subscriber = await connect()
    await subscriber.subscribe("feed.#")
    publisher = await connect()
    for name in ["feedback", "x.feed", "feed", "feed.a", "feed.a.b"]:
        await publisher.publish(name, name)
    assert await subscriber.messages(3) == [("feed", 1, "feed"), ("feed.a", 1, "feed.a"), ("feed.a.b", 1, "feed.a.b")]


async def test_a_pattern_subscription_follows_matching_topics_created_later(connect):
    await make_topics("later.marker")
    subscriber = await connect()
    await subscriber.subscribe("later.#")
    await subscriber.subscribe("later.marker")
    created = await create_topic("later.new")
    await events.announce_topic_created(created)
    unrelated = await create_topic("sooner.new")
    await events.announce_topic_created(unrelated)
    publisher = await connect()
    await publisher.publish("sooner.new", "unwanted")
    await publisher.publish("later.new", "wanted")
    assert await subscriber.messages(1) == [("later.new", 1, "wanted")]


async def test_a_topic_created_and_published_to_before_its_announcement_is_replayed_from_its_start(connect):
    subscriber = await connect()
    await subscriber.subscribe("early.*")
    created = await create_topic("early.bird")
    await publish_quietly("early.bird", "one")
    await publish_quietly("early.bird", "two")
    await events.announce_topic_created(created)
    assert await subscriber.messages(2) == [("early.bird", 1, "one"), ("early.bird", 2, "two")]


async def test_a_topic_matched_by_two_subscriptions_is_delivered_once_until_both_are_gone(connect):
    await make_topics("twice.t", "twice.marker")
    subscriber = await connect()
    await subscriber.subscribe("twice.t")
    await subscriber.subscribe("twice.*")
    publisher = await connect()
    await publisher.publish("twice.t", "once")
    await publisher.publish("twice.marker", "m1")
    assert await subscriber.messages(2) == [("twice.t", 1, "once"), ("twice.marker", 1, "m1")]
    await subscriber.unsubscribe("twice.*")
    await subscriber.subscribe("twice.marker")
    await publisher.publish("twice.t", "still")  # still followed by name
    await publisher.publish("twice.marker", "m2")
    assert await subscriber.messages(2) == [("twice.t", 2, "still"), ("twice.marker", 2, "m2")]
    await subscriber.unsubscribe("twice.t")
    await publisher.publish("twice.t", "gone")
    await publisher.publish("twice.marker", "m3")
    assert await subscriber.messages(1) == [("twice.marker", 3, "m3")]


# --- since: replay, then live -------------------------------------------------------------------------


async def test_since_replays_the_stored_messages_after_it_then_continues_live(connect):
    await make_topics("replay")
    for i in range(1, 6):
        await publish_quietly("replay", f"m{i}")
    subscriber = await connect()
    await subscriber.subscribe("replay", since=2)
    assert await subscriber.messages(3) == [("replay", 3, "m3"), ("replay", 4, "m4"), ("replay", 5, "m5")]
    await (await connect()).publish("replay", "m6")
    assert await subscriber.messages(1) == [("replay", 6, "m6")]


async def test_since_zero_replays_everything_and_since_beyond_the_newest_replays_nothing(connect):
    await make_topics("replay.ends", "replay.marker")
    await publish_quietly("replay.ends", "only")
    everything = await connect()
    await everything.subscribe("replay.ends", since=0)
    assert await everything.messages(1) == [("replay.ends", 1, "only")]
    future = await connect()
    await future.subscribe("replay.ends", since=1000)
    await (await connect()).publish("replay.ends", "next")
    assert await future.messages(1) == [("replay.ends", 2, "next")]
    assert await everything.messages(1) == [("replay.ends", 2, "next")]


async def test_since_applies_to_every_topic_a_pattern_matches(connect):
    await make_topics("multi.a", "multi.b")
    for name in ["multi.a", "multi.b"]:
        for i in range(1, 4):
            await publish_quietly(name, f"{name}-{i}")
    subscriber = await connect()
    await subscriber.subscribe("multi.*", since=1)
    assert await subscriber.messages(4) == [
        ("multi.a", 2, "multi.a-2"),
        ("multi.a", 3, "multi.a-3"),
        ("multi.b", 2, "multi.b-2"),
        ("multi.b", 3, "multi.b-3"),
    ]


async def test_since_replay_while_others_publish_has_no_gap_and_no_duplicate(connect):
    await make_topics("busy")
    # Every ``since`` below is at most the newest id when its SUBSCRIBE arrives;
    # one beyond it would continue live from the newest id, whatever the publishers reached.
    for i in range(1, 31):
        await publish_quietly("busy", f"m{i}")
    publishers = [await connect() for _ in range(3)]

    async def publish_many(peer: TopicPeer, tag: str) -> None:
        for i in range(15):
            await peer.publish("busy", f"{tag}{i}")

    subscribers = [await connect() for _ in range(4)]
    running = [asyncio.ensure_future(publish_many(peer, f"p{n}-")) for n, peer in enumerate(publishers)]
    for since, subscriber in zip([0, 5, 20, 30], subscribers, strict=True):
        await subscriber.subscribe("busy", since=since)
    await asyncio.gather(*running)
    stored = await stored_messages("busy")
    assert len(stored) == 75
    for since, subscriber in zip([0, 5, 20, 30], subscribers, strict=True):
        expected = [("busy", seq, data) for seq, data in stored if seq > since]
        assert await subscriber.messages(len(expected)) == expected


# --- ordering -----------------------------------------------------------------------------------------


async def test_messages_whose_events_arrive_out_of_order_are_sent_in_order_and_once(connect):
    topic = (await make_topics("shuffled"))["shuffled"]
    subscriber = await connect()
    await subscriber.subscribe("shuffled")
    published = [await publish_quietly("shuffled", f"m{i}") for i in range(1, 6)]
    layer = get_channel_layer()
    for index in [2, 0, 4, 1, 3, 2]:  # #3 first, then #1, #5, #2, #4 and #3 again
        await layer.group_send(events.topic_group(topic.id), events.message_event(published[index]))
    await layer.group_send(events.topic_group(topic.id), events.message_event(await publish_quietly("shuffled", "m6")))
    assert await subscriber.messages(6) == [("shuffled", i, f"m{i}") for i in range(1, 7)]


async def test_concurrent_publishers_on_two_topics_reach_every_subscriber_in_order(connect):
    await make_topics("race.a", "race.b")
    subscribers = {name: [await connect() for _ in range(3)] for name in ["race.a", "race.b"]}
    for name, peers in subscribers.items():
        for peer in peers:
            await peer.subscribe(name)
    both = await connect()
    await both.subscribe("race.*")
    publishers = [await connect() for _ in range(4)]

    async def publish_many(peer: TopicPeer, tag: str) -> None:
        for i in range(10):
            await peer.publish("race.a" if i % 2 else "race.b", f"{tag}-{i}")

    await asyncio.gather(*(publish_many(peer, f"p{n}") for n, peer in enumerate(publishers)))
    for name, peers in subscribers.items():
        expected = [(name, seq, data) for seq, data in await stored_messages(name)]
        assert [seq for _, seq, _ in expected] == list(range(1, 21))
        for peer in peers:
            assert await peer.messages(20) == expected
    received = await both.messages(40)
    for name in ["race.a", "race.b"]:
        assert [seq for topic, seq, _ in received if topic == name] == list(range(1, 21))
