"""The client library's Client and Worker against a real broker process."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tests.e2e.conftest import stack  # noqa: F401  (the fixture: both stacks)
from tests.e2e.servers import REPO_ROOT, Stack, embedded_stack, free_port
from turtlemq_client import BadFrame, Client, ConnectionLost, TaskFailed, Worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One embedded broker for the tests of this module that leave its queue empty."""
    with embedded_stack(tmp_path_factory.mktemp("client-tasks")) as running:
        yield running


async def eventually(condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_many_submissions_in_flight_each_get_their_own_result(stack):  # noqa: F811
    async def reverse(data: str) -> str:
        return data[::-1]

    async with Worker(stack.worker_url, reverse, concurrency=4), Client(stack.client_url) as client:
        data = [f"task-{n:03d}" for n in range(60)]
        results = await asyncio.wait_for(asyncio.gather(*(client.submit(d) for d in data)), 60)
        assert results == [d[::-1] for d in data]
        assert client.pending == 0


async def test_a_worker_holds_at_most_its_concurrency_in_tasks_at_once(broker):
    running, peak = 0, 0
    gate = asyncio.Event()

    async def held(data: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await gate.wait()
            return data
        finally:
            running -= 1

    async with Worker(broker.worker_url, held, concurrency=3), Client(broker.client_url) as client:
        submissions = [asyncio.create_task(client.submit(f"c{n}")) for n in range(9)]
        await eventually(lambda: running == 3, "three tasks running")

        async def three_running_six_queued() -> bool:
            counts = await client.status()
            return (counts["runningTasks"], counts["queuedTasks"]) == (3, 6)

        await eventually(three_running_six_queued, "the broker to hold the other six back")
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(*submissions), 30) == [f"c{n}" for n in range(9)]
    assert peak == 3


async def test_sync_handlers_run_in_threads_as_many_at_once_as_the_concurrency(broker):
    # Eight at once: more than the default executor of a two-core machine runs (6).
    barrier = threading.Barrier(8, timeout=15)

    def meet(data: str) -> str:
        barrier.wait()
        return f"{data} met {threading.current_thread().name.startswith('turtlemq-worker')}"

    async with Worker(broker.worker_url, meet, concurrency=8), Client(broker.client_url) as client:
        results = await asyncio.wait_for(asyncio.gather(*(client.submit(f"t{n}") for n in range(8))), 30)
    assert results == [f"t{n} met True" for n in range(8)]


async def test_a_handler_that_raises_fails_the_task_and_the_client_gets_task_failed_after_its_attempts(broker):
    attempts = 0

    def explode(data: str) -> str:
        nonlocal attempts
        attempts += 1
        raise ValueError(f"{data} exploded on attempt {attempts}")

    async with Worker(broker.worker_url, explode), Client(broker.client_url) as client:
        with pytest.raises(TaskFailed) as failure:
            await asyncio.wait_for(client.submit("bomb", max_attempts=3), 30)
    assert attempts == 3
    assert failure.value.reason == "ValueError: bomb exploded on attempt 3"


async def test_a_task_the_broker_refuses_raises_its_typed_error_and_the_client_goes_on(broker):
    async def echo(data: str) -> str:
        return data

    async with Worker(broker.worker_url, echo), Client(broker.client_url) as client:
        with pytest.raises(BadFrame) as refused:
            await asyncio.wait_for(client.submit("x", max_attempts=0), 10)
        assert refused.value.code == "BAD_FRAME"
        assert refused.value.ref["type"] == "REQUEST_TASK"
        assert await asyncio.wait_for(client.submit("still fine"), 10) == "still fine"


KILLABLE_WORKER = """
import asyncio, sys
from turtlemq_client import Worker

async def hold(data):
    print("GOT", data, flush=True)
    await asyncio.Event().wait()  # never answers: the test kills this process mid-task

async def main():
    async with Worker(sys.argv[1], hold) as worker:
        print("READY", flush=True)
        await worker.run()

asyncio.run(main())
"""


async def expect_line(process: asyncio.subprocess.Process, expected: str, timeout: float = 20.0) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    assert line.decode().strip() == expected


async def test_the_task_of_a_worker_killed_mid_task_completes_on_another_worker(broker):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLABLE_WORKER, broker.worker_url, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        await expect_line(process, "READY")
        async with Client(broker.client_url) as client:
            submission = asyncio.create_task(client.submit("migrate me"))
            await expect_line(process, "GOT migrate me")

            async def upper(data: str) -> str:
                return data.upper()

            async with Worker(broker.worker_url, upper):
                process.kill()
                assert await asyncio.wait_for(submission, 30) == "MIGRATE ME"
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_a_client_that_cannot_reach_the_broker_gives_up_with_connection_lost():
    client = Client(f"ws://127.0.0.1:{free_port()}/", give_up_after=0.5)
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(client.submit("nobody home"), 10)
    await client.close()


async def test_a_worker_touching_its_task_keeps_it_past_the_lease(broker):
    calls = 0

    async def slow(data: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(2.5)  # the work itself: longer than the one-second lease
        return f"{data} done"

    async with Worker(broker.worker_url, slow, touch_every=0.3), Client(broker.client_url) as client:
        assert await asyncio.wait_for(client.submit("long", timeout=1.0), 30) == "long done"
    assert calls == 1
