"""A broker restarted under a connected Client, Worker and Subscriber: they come back, nothing lost or repeated."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tests.e2e.conftest import stack  # noqa: F401  (the fixture: both stacks)
from tests.e2e.servers import Stack
from turtlemq_client import Backoff, Client, Message, Subscriber, Worker, publish

from .test_client_tasks import eventually

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class HeldBackoff(Backoff):
    """Reconnects only once the test opens the gate, so that it controls what happens meanwhile."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, delay: float) -> None:
        await self.gate.wait()
        await super().wait(delay)


def restart(running: Stack) -> None:
    """Stop every broker process, then start them again on their ports: an outage."""
    for server in running.servers:
        server.stop()
    for server in running.servers:
        server.start()


async def test_client_worker_and_subscriber_lose_nothing_and_repeat_nothing_across_a_broker_restart(
    stack,  # noqa: F811
):
    held = HeldBackoff(initial=0.05, maximum=0.2)
    fast = Backoff(initial=0.05, maximum=0.5)
    work = asyncio.Event()
    started: Counter[str] = Counter()
    finished: Counter[str] = Counter()

    async def upper_when_allowed(data: str) -> str:
        started[data] += 1
        await work.wait()
        finished[data] += 1
        return data.upper()

    async with (
        Worker(stack.worker_url, upper_when_allowed, concurrency=3, backoff=fast) as worker,
        Client(stack.client_url, backoff=held) as client,
        Subscriber(stack.client_url, "React", backoff=held) as subscriber,
    ):
        assert await publish(stack.client_url, "React", "before") == 1
        assert await subscriber.next_message(15) == Message("React", 1, "before")
        before = [asyncio.create_task(client.submit(f"task {n}")) for n in range(3)]
        await eventually(lambda: sum(started.values()) == 3, "the worker to hold all three tasks")

        await asyncio.to_thread(restart, stack)

        # While the client and the subscriber are away: messages are published, a task is submitted,
        # the worker comes back, gets its three tasks again and finishes them.
        assert await publish(stack.client_url, "React", "during 1") == 2
        assert await publish(stack.client_url, "React", "during 2") == 3
        during = asyncio.create_task(client.submit("task 3"))
        work.set()
        await eventually(lambda: sum(finished.values()) == 3, "the worker to finish the three tasks", 30)
        assert client.connection.generation == subscriber.connection.generation == 1  # still away
        assert worker.connection.generation == 2

        held.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*before, during), 30)
        assert results == ["TASK 0", "TASK 1", "TASK 2", "TASK 3"]
        received = [await subscriber.next_message(15) for _ in range(2)]
        assert [(m.id, m.data) for m in received] == [(2, "during 1"), (3, "during 2")]
        assert await publish(stack.client_url, "React", "after") == 4
        assert (await subscriber.next_message(15)).data == "after"  # not a replayed duplicate

        async def nothing_left() -> bool:
            counts = await client.status()
            return counts["queuedTasks"] == counts["runningTasks"] == 0

        await eventually(nothing_left, "the queue to drain")
        # Re-sent REQUEST_TASKs created no second task: each one ran to the end exactly once.
        assert finished == {f"task {n}": 1 for n in range(4)}
        assert client.connection.generation == 2
