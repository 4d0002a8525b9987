"""The per-process topic fan-out (``subscriptions.fanout``) on the in-memory layer and on channels-redis.

These tests need no database: a follower here is a stand-in that records what
the fan-out offers it, and messages are layer events sent with ``group_send``
as ``announce_message`` sends them. Each runs on a layer of its own, an
in-memory one and (when Redis answers) a channels-redis one under a prefix of
its own, configured like the broker's (``socket_timeout`` included, which
matters: redis-py then sends each command through ``asyncio.wait_for``).

What they show: one group member and one layer message per process and topic
however many followers, the frame encoded once, the group left by the last
follower, memberships renewed and rejoined after a failed read, and a reader
that ends cleanly, whether the node stops it or its event loop just ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from channels.layers import BaseChannelLayer, InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from subscriptions import fanout as fanout_module
from subscriptions.events import TopicMessageEvent, topic_group
from subscriptions.fanout import ProcessFanout, process_fanout, stop_process_fanout
from tests.services import REDIS_URL

TIMEOUT = 10.0
TOPIC = 4_000_001  # ids no topic of the database has: the groups are this test's own
OTHER_TOPIC = 4_000_002


def redis_reachable() -> bool:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError:
        return False
    return True


REDIS = redis_reachable()
needs_redis = pytest.mark.skipif(not REDIS, reason=f"Redis at {REDIS_URL} is not reachable")


def make_layer(kind: str, prefix: str | None = None, **config: Any) -> BaseChannelLayer:
    """A fresh layer configured like the broker's (see ``turtlemq_site.settings``)."""
    if kind == "memory":
        return InMemoryChannelLayer(capacity=10_000, expiry=60, **config)
    return RedisChannelLayer(
        hosts=[{"address": REDIS_URL, "socket_timeout": 30}],
        prefix=prefix or f"turtlemq-test-fanout-{uuid.uuid4().hex[:12]}",
        capacity=10_000,
        expiry=60,
        **config,
    )


async def discard_layer(layer: BaseChannelLayer) -> None:
    """Delete what the layer left in Redis and close its connections."""
    if isinstance(layer, RedisChannelLayer):
        await layer.flush()


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def layer(request: pytest.FixtureRequest) -> AsyncIterator[BaseChannelLayer]:
    made = make_layer(request.param)
    yield made
    await discard_layer(made)


class Collector:
    """A stand-in follower: records each offered message as (id, frame text)."""

    def __init__(self, name: str) -> None:
        self.channel_name = name
        self.offered: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def offer_topic_message(self, event: TopicMessageEvent, text: str) -> None:
        self.offered.put_nowait((event["id"], text))

    async def next(self) -> tuple[int, str]:
        return await asyncio.wait_for(self.offered.get(), TIMEOUT)

    async def ids(self, count: int) -> list[int]:
        return [(await self.next())[0] for _ in range(count)]


def event(topic_id: int, seq: int) -> TopicMessageEvent:
    return {"type": "topic.message", "topic_id": topic_id, "topic": f"t{topic_id}", "id": seq, "data": f"m{seq}"}


async def announce(layer: BaseChannelLayer, topic_id: int, seq: int) -> None:
    """What ``announce_message`` does after a commit."""
    await layer.group_send(topic_group(topic_id), event(topic_id, seq))


async def group_members(layer: BaseChannelLayer, topic_id: int) -> set[str]:
    """The channels in a topic's group, read from the layer's own storage."""
    group = topic_group(topic_id)
    if isinstance(layer, RedisChannelLayer):
        connection = layer.connection(layer.consistent_hash(group))
        return {member.decode() for member in await connection.zrange(layer._group_key(group), 0, -1)}
    return set(layer.groups.get(group, {}))


async def join_time(layer: BaseChannelLayer, topic_id: int, channel: str) -> float | None:
    group = topic_group(topic_id)
    if isinstance(layer, RedisChannelLayer):
        connection = layer.connection(layer.consistent_hash(group))
        return await connection.zscore(layer._group_key(group), channel)
    return layer.groups.get(group, {}).get(channel)


def count_receives(layer: BaseChannelLayer) -> dict[str, int]:
    """Wrap ``layer.receive`` to count the ``topic.message`` events each channel receives."""
    counts: dict[str, int] = {}
    receive = layer.receive

    async def counting(channel: str) -> dict[str, Any]:
        message = await receive(channel)
        if message.get("type") == "topic.message":
            counts[channel] = counts.get(channel, 0) + 1
        return message

    layer.receive = counting  # type: ignore[method-assign]
    return counts


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds, for at most ``TIMEOUT`` seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not await condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {TIMEOUT} s"
        await asyncio.sleep(0.02)


def fanout_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("turtlemq topic")]


def assert_receive_state_released(layer: BaseChannelLayer) -> None:
    """channels-redis's shared receive state is back to idle: a later event loop may receive."""
    if isinstance(layer, RedisChannelLayer):
        assert (layer.receive_count, layer.receive_lock, layer.receive_event_loop) == (0, None, None)


# --- one layer message per process and topic ---------------------------------------------------


async def test_many_followers_make_one_group_member_and_one_layer_message_per_published_message(layer):
    fanout = ProcessFanout(layer)
    counts = count_receives(fanout.channel_layer)
    followers = [Collector(f"follower{n}") for n in range(25)]
    for follower in followers:
        await fanout.follow(TOPIC, follower)
    try:
        assert fanout.shared
        assert await group_members(layer, TOPIC) == {fanout.channel}
        for seq in range(1, 6):
            await announce(layer, TOPIC, seq)
        offered = [[await follower.next() for _ in range(5)] for follower in followers]
        assert all([seq for seq, _ in got] == [1, 2, 3, 4, 5] for got in offered)
        assert offered[0][0][1] == '{"type":"MESSAGE","topic":"t4000001","id":1,"data":"m1"}'
        for index in range(5):
            # The frame was encoded once and the same text offered to every follower.
            assert len({id(got[index][1]) for got in offered}) == 1
        assert counts == {fanout.channel: 5}
    finally:
        await fanout.stop()


@needs_redis
async def test_each_broker_process_gets_one_redis_message_per_published_message():
    # Two layers with one prefix are what two broker processes sharing a Redis have.
    prefix = f"turtlemq-test-fanout-{uuid.uuid4().hex[:12]}"
    layers = [make_layer("redis", prefix), make_layer("redis", prefix)]
    fanouts = [ProcessFanout(each) for each in layers]
    counts = [count_receives(fanout.channel_layer) for fanout in fanouts]
    followers = [[Collector(f"p{p}f{n}") for n in range(10)] for p in range(2)]
    try:
        for fanout, local in zip(fanouts, followers, strict=True):
            for follower in local:
                await fanout.follow(TOPIC, follower)
        assert await group_members(layers[0], TOPIC) == {fanouts[0].channel, fanouts[1].channel}
        for seq in range(1, 4):
            await announce(layers[0], TOPIC, seq)
        for local in followers:
            for follower in local:
                assert await follower.ids(3) == [1, 2, 3]
        assert counts == [{fanouts[0].channel: 3}, {fanouts[1].channel: 3}]
    finally:
        for fanout in fanouts:
            await fanout.stop()
        for each in layers:
            await discard_layer(each)


async def test_a_topic_without_followers_here_is_not_delivered_here(layer):
    fanout = ProcessFanout(layer)
    here, elsewhere = Collector("here"), Collector("elsewhere")
    await fanout.follow(TOPIC, here)
    try:
        await announce(layer, OTHER_TOPIC, 1)  # no member of ours in that group
        await announce(layer, TOPIC, 1)
        assert await here.next() == (1, '{"type":"MESSAGE","topic":"t4000001","id":1,"data":"m1"}')
        assert elsewhere.offered.empty()
        assert await group_members(layer, OTHER_TOPIC) == set()
    finally:
        await fanout.stop()


# --- group membership ----------------------------------------------------------------------------


async def test_the_last_follower_leaving_takes_the_process_channel_out_of_the_group(layer):
    fanout = ProcessFanout(layer)
    first, second = Collector("first"), Collector("second")
    await fanout.follow(TOPIC, first)
    await fanout.follow(TOPIC, second)
    try:
        channel = fanout.channel
        await fanout.unfollow(TOPIC, first)
        assert await group_members(layer, TOPIC) == {channel}
        await fanout.unfollow(TOPIC, first)  # twice: nothing more happens
        await fanout.unfollow(TOPIC, second)
        assert await group_members(layer, TOPIC) == set()
        assert fanout.followers == {}
        # Following again joins again, on the same process channel.
        await fanout.follow(TOPIC, second)
        assert await group_members(layer, TOPIC) == {channel}
        await announce(layer, TOPIC, 7)
        assert (await second.next())[0] == 7
        assert first.offered.empty()
    finally:
        await fanout.stop()


async def test_followers_that_join_at_once_all_hear_the_group_when_follow_returns(layer):
    fanout = ProcessFanout(layer)
    followers = [Collector(f"f{n}") for n in range(20)]
    await asyncio.gather(*(fanout.follow(TOPIC, follower) for follower in followers))
    try:
        await announce(layer, TOPIC, 1)
        for follower in followers:
            assert (await follower.next())[0] == 1
        # Leaving and joining at once leaves the channel in the group of whoever follows last.
        await asyncio.gather(*(fanout.unfollow(TOPIC, follower) for follower in followers[:-1]))
        await asyncio.gather(fanout.unfollow(TOPIC, followers[-1]), fanout.follow(TOPIC, followers[0]))
        assert await group_members(layer, TOPIC) == {fanout.channel}
        assert fanout.followers == {TOPIC: {followers[0]}}
    finally:
        await fanout.stop()


async def test_memberships_are_renewed_well_before_the_group_expires(layer, monkeypatch):
    assert ProcessFanout(layer).refresh_seconds == 86400 / 4  # the layers' default group_expiry: a day
    fanout = ProcessFanout(layer)
    fanout.refresh_seconds = 0.2  # what a group_expiry of 0.8 s would give
    follower = Collector("follower")
    await fanout.follow(TOPIC, follower)
    try:
        channel = fanout.channel
        joined = await join_time(layer, TOPIC, channel)
        assert joined is not None
        # Behind the fan-out's back, as expiry would: the keeper puts it back with a fresh join time.
        await layer.group_discard(topic_group(TOPIC), channel)

        async def renewed() -> bool:
            again = await join_time(layer, TOPIC, channel)
            return again is not None and again > joined

        await eventually(renewed, "the membership's renewal")
        await announce(layer, TOPIC, 1)
        assert (await follower.next())[0] == 1
    finally:
        await fanout.stop()


async def test_after_a_failed_read_the_reader_rejoins_its_groups_and_reads_on(layer, monkeypatch, caplog):
    monkeypatch.setattr(fanout_module, "READ_RETRY_SECONDS", 0.05)
    fanout = ProcessFanout(layer)
    receive = fanout.channel_layer.receive

    async def failing_on_request(channel: str) -> dict[str, Any]:
        message = await receive(channel)
        if message.get("type") == "test.fail":
            raise ConnectionError("Redis went away")  # what redis-py raises then
        return message

    fanout.channel_layer.receive = failing_on_request  # type: ignore[method-assign]
    follower = Collector("follower")
    await fanout.follow(TOPIC, follower)
    try:
        # A Redis restarted without persistence has forgotten the groups; then the read fails.
        await layer.group_discard(topic_group(TOPIC), fanout.channel)
        with caplog.at_level(logging.ERROR, logger="turtlemq.subscriptions"):
            await layer.send(fanout.channel, {"type": "test.fail"})

            async def rejoined() -> bool:
                return await group_members(layer, TOPIC) == {fanout.channel}

            await eventually(rejoined, "rejoining the topic's group")
        assert "could not read this process's topic channel; retrying" in caplog.text
        await announce(layer, TOPIC, 1)
        assert (await follower.next())[0] == 1
    finally:
        await fanout.stop()


@needs_redis
async def test_when_redis_drops_the_readers_connection_and_forgets_the_groups_the_reader_recovers(monkeypatch, caplog):
    monkeypatch.setattr(fanout_module, "READ_RETRY_SECONDS", 0.05)
    prefix = f"turtlemq-test-fanout-{uuid.uuid4().hex[:12]}"
    name = f"turtlemq-test-{uuid.uuid4().hex[:12]}"  # a client name of this test's own: only its connections go
    subscribing = RedisChannelLayer(
        hosts=[{"address": REDIS_URL, "socket_timeout": 30, "client_name": name}], prefix=prefix, capacity=10_000
    )
    publishing = make_layer("redis", prefix)
    admin = redis.asyncio.Redis.from_url(REDIS_URL)
    fanout = ProcessFanout(subscribing)
    follower = Collector("follower")
    await fanout.follow(TOPIC, follower)
    try:
        await announce(publishing, TOPIC, 1)
        assert (await follower.next())[0] == 1

        async def reader_waits() -> bool:
            return any(c.get("name") == name and c.get("cmd") == "bzpopmin" for c in await admin.client_list())

        await eventually(reader_waits, "the reader's BZPOPMIN")
        with caplog.at_level(logging.INFO, logger="turtlemq.subscriptions"):
            # As a Redis restarted without persistence: connections dropped, groups gone.
            for client in await admin.client_list():
                if client.get("name") == name:
                    await admin.client_kill_filter(_id=client["id"])
            await admin.delete(publishing._group_key(topic_group(TOPIC)))

            async def rejoined() -> bool:
                return await group_members(publishing, TOPIC) == {fanout.channel}

            await eventually(rejoined, "rejoining the topic's group")
            await announce(publishing, TOPIC, 2)
            assert (await follower.next())[0] == 2
        assert "could not read this process's topic channel; retrying" in caplog.text
        assert "this process's topic channel is readable again" in caplog.text
    finally:
        await fanout.stop()
        await discard_layer(publishing)
        await admin.aclose()


# --- stopping ------------------------------------------------------------------------------------


async def test_stop_ends_the_reader_leaves_every_group_and_releases_the_layer(layer):
    fanout = process_fanout(layer)
    follower = Collector("follower")
    await fanout.follow(TOPIC, follower)
    await fanout.follow(OTHER_TOPIC, follower)
    await announce(layer, TOPIC, 1)
    assert (await follower.next())[0] == 1  # the reader is running
    assert len(fanout_tasks()) == 2  # the keeper and the reader
    await stop_process_fanout()
    assert fanout_tasks() == []
    assert await group_members(layer, TOPIC) == set()
    assert await group_members(layer, OTHER_TOPIC) == set()
    assert_receive_state_released(fanout.channel_layer)
    await stop_process_fanout()  # again: nothing to do
    # A connection following afterwards gets a fan-out of its own.
    again = process_fanout(layer)
    assert again is not fanout
    await again.follow(TOPIC, follower)
    await announce(layer, TOPIC, 2)
    assert (await follower.next())[0] == 2
    await stop_process_fanout()


async def test_stop_ends_a_reader_that_swallowed_its_first_cancellation(layer):
    """What redis-py does on Python 3.11 when the cancellation meets a command's send (see ``broker.aio.end_task``)."""
    fanout = ProcessFanout(layer)
    receive = fanout.channel_layer.receive
    swallowed = asyncio.Event()

    async def swallowing_once(channel: str) -> dict[str, Any]:
        try:
            return await receive(channel)
        except asyncio.CancelledError:
            if swallowed.is_set():
                raise
            swallowed.set()
            return await receive(channel)  # goes on waiting, still "cancelling"

    fanout.channel_layer.receive = swallowing_once  # type: ignore[method-assign]
    await fanout.follow(TOPIC, Collector("follower"))
    await asyncio.wait_for(fanout.stop(), TIMEOUT)
    assert swallowed.is_set()
    assert fanout_tasks() == []
    assert_receive_state_released(fanout.channel_layer)


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=needs_redis)])
@pytest.mark.parametrize("swallow", [False, True], ids=["", "swallowing"])
def test_a_reader_left_running_when_its_event_loop_ends_ends_with_it_and_the_next_loop_reads_on(
    kind, swallow, monkeypatch, caplog
):
    """Each test gets an event loop of its own and may leave the reader running: the loop's end must end it."""
    layer = make_layer(kind)
    if swallow:
        receive = type(layer).receive

        async def swallowing_once(self: BaseChannelLayer, channel: str) -> dict[str, Any]:
            try:
                return await receive(self, channel)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling() > 1:
                    raise
                return await receive(self, channel)  # goes on waiting, still "cancelling"

        monkeypatch.setattr(type(layer), "receive", swallowing_once)
    fanouts: list[ProcessFanout] = []

    async def follow_and_hear(seq: int) -> None:
        follower = Collector(f"follower{seq}")
        fanouts.append(process_fanout(layer))
        await fanouts[-1].follow(TOPIC, follower)
        await announce(layer, TOPIC, seq)
        assert (await follower.next())[0] == seq

    def in_a_loop_of_its_own(seq: int) -> None:
        with asyncio.Runner() as runner:
            runner.run(follow_and_hear(seq))
        # leaving the ``with`` cancels what the loop still runs, waits for it, closes the loop

    with caplog.at_level(logging.WARNING):
        for seq in (1, 2, 3):
            # In a thread, to fail rather than hang should the loop's end wait forever.
            ended = threading.Thread(target=in_a_loop_of_its_own, args=(seq,), daemon=True)
            ended.start()
            ended.join(TIMEOUT)
            assert not ended.is_alive(), "the event loop could not end: its reader did not"
            assert fanouts[-1]._keeper is not None and fanouts[-1]._keeper.cancelled()
            assert_receive_state_released(layer)
        gc.collect()  # a task dropped pending would say so now
    problems = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert problems == []
    with asyncio.Runner() as runner:
        runner.run(discard_layer(layer))
