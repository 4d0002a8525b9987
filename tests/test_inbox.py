"""Task events between broker processes on Redis (``broker.inbox``): one message per batch and process.

Two channels-redis layer instances under one prefix stand for two broker
processes (each instance has a client prefix of its own, as each process
has). A stand-in consumer records what it is handed in-process.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from channels_redis.core import RedisChannelLayer

from broker import events, inbox, local
from broker.dispatch import Assignment, Effects, Outcome
from tests.pgproxy import CuttingProxy
from tests.test_email_notifications import free_port
from tests.test_fanout import REDIS_URL, TIMEOUT, discard_layer, make_layer, needs_redis

pytestmark = needs_redis


class Recorder:
    """A consumer of 'the other process': keeps what reaches it, in order."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.received: list[Any] = []
        self.arrived = asyncio.Event()

    async def send_assignment(self, assignment: Assignment) -> None:
        self.received.append(("task", assignment.task_id, assignment.data))
        self.arrived.set()

    async def send_outcome(self, outcome: Outcome) -> None:
        self.received.append(("outcome", outcome.task_id, outcome.message_id, outcome.ok, outcome.data))
        self.arrived.set()

    async def wait_for(self, count: int) -> list[Any]:
        async with asyncio.timeout(TIMEOUT):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.received


@pytest.fixture
async def processes():
    """(the announcing process's layer, the other process's layer): one Redis prefix, two client prefixes."""
    here = make_layer("redis")
    there = make_layer("redis", prefix=here.prefix)
    yield here, there
    await inbox.stop()
    await discard_layer(here)


async def test_a_batch_s_events_for_another_process_travel_as_one_message_on_its_inbox(processes, monkeypatch):
    here, there = processes
    worker = Recorder(await there.new_channel())
    client = Recorder(await there.new_channel())
    posted: list[int] = []
    real_post = inbox.post

    async def counting_post(layer: Any, sent: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        posted.append(len(sent))
        return await real_post(layer, sent)

    monkeypatch.setattr(inbox, "post", counting_post)
    # One process holds both ends here: to the announcer, no connection is local.
    monkeypatch.setattr(events, "local", type("Elsewhere", (), {"peer": staticmethod(lambda channel: None)}))
    for recorder in (worker, client):
        local.register(recorder.channel, recorder)  # for the other process's reader
    try:
        await inbox.start(there)
        effects = Effects(
            assignments=[Assignment(worker.channel, "41", "one"), Assignment(worker.channel, "42", "two")],
            outcomes=[Outcome(client.channel, 40, "m40", True, "ZERO")],
        )
        await events.ring(effects, here)

        assert await worker.wait_for(2) == [("task", "41", "one"), ("task", "42", "two")]
        assert await client.wait_for(1) == [("outcome", 40, "m40", True, "ZERO")]
        assert posted == [3]  # one message for three events
    finally:
        for recorder in (worker, client):
            local.unregister(recorder.channel)


async def test_an_event_for_a_connection_that_closed_meanwhile_is_dropped_and_the_rest_delivered(processes):
    here, there = processes
    gone = await there.new_channel()
    alive = Recorder(await there.new_channel())
    local.register(alive.channel, alive)
    try:
        await inbox.start(there)
        left = await inbox.post(
            here,
            [(gone, {"type": "task.assign", "task_id": "7", "data": "lost"}),
             (alive.channel, {"type": "task.assign", "task_id": "8", "data": "kept"})],
        )  # fmt: skip
        assert left == []
        assert await alive.wait_for(1) == [("task", "8", "kept")]
    finally:
        local.unregister(alive.channel)


async def test_a_channel_of_no_broker_process_is_left_to_the_layer(processes):
    here, _ = processes
    left = await inbox.post(here, [("plain-channel", {"type": "task.assign", "task_id": "1", "data": "x"})])
    assert left == [("plain-channel", {"type": "task.assign", "task_id": "1", "data": "x"})]


async def test_an_inbox_nobody_reads_expires_with_the_layer_s_messages(processes):
    here, there = processes
    channel = await there.new_channel()
    await inbox.post(here, [(channel, {"type": "task.assign", "task_id": "1", "data": "x"})])
    key = inbox.inbox_of(here, channel)
    assert key is not None
    connection = here.connection(here.consistent_hash(key))
    assert 0 < await connection.ttl(key) <= here.expiry


async def test_events_that_could_not_be_posted_go_again_once_redis_answers(monkeypatch):
    """Redis out of reach for the announcing process for a moment: its doorbells ring again, once."""
    port = free_port()
    prefix = f"turtlemq-test-inbox-{uuid.uuid4().hex[:12]}"
    # The announcing process reaches Redis through a port where nothing listens yet.
    here = RedisChannelLayer(hosts=[{"address": f"redis://127.0.0.1:{port}", "socket_timeout": 5}], prefix=prefix)
    there = make_layer("redis", prefix=prefix)
    worker = Recorder(await there.new_channel())
    monkeypatch.setattr(events, "RING_AGAIN_AFTER", (0.05, 0.2, 0.5, 1.0, 2.0))
    monkeypatch.setattr(events, "local", type("Elsewhere", (), {"peer": staticmethod(lambda channel: None)}))
    local.register(worker.channel, worker)
    redis_host, redis_port = urlsplit(REDIS_URL).hostname, urlsplit(REDIS_URL).port or 6379
    forwarder = CuttingProxy(redis_host or "127.0.0.1", redis_port)
    try:
        await inbox.start(there)
        await events.ring(Effects(assignments=[Assignment(worker.channel, "41", "one")]), here)
        assert worker.received == []  # Redis was out of reach: nothing went

        await forwarder.start(port)  # Redis answers again

        assert await worker.wait_for(1) == [("task", "41", "one")]
    finally:
        local.unregister(worker.channel)
        await inbox.stop()
        await discard_layer(there)
        await forwarder.close()
