"""End-to-end tests of task distribution: real daphne processes, real WebSocket clients.

Tests taking the ``stack`` fixture run twice: on the embedded default (SQLite,
in-memory layer, one process) and on PostgreSQL + Redis with two broker
processes, clients on the first and workers on the second. Tests taking
``two_process_stack`` are about several processes and run on the latter only.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from .peers import EchoWorker, Peer, wait_until
from .servers import Stack
from .worker_process import WorkerProcess

pytestmark = pytest.mark.e2e

# The frame limit for the bad-input tests; small so that an oversize frame is cheap to send.
SMALL_FRAME_LIMIT = 4096


def results_by_message_id(frames: list[dict]) -> dict[str, str]:
    """RESPONSE_TASK frames as {messageId: data}, failing on a repeated messageId."""
    counts = Counter(frame["messageId"] for frame in frames)
    assert [m for m, n in counts.items() if n > 1] == [], "a result arrived twice"
    return {frame["messageId"]: frame["data"] for frame in frames}


async def poll_status(peer: Peer, expected: dict[str, int], timeout: float = 10.0) -> None:
    """Ask for STATUS until it equals ``expected``; fail with the last answer after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (status := await peer.status()) != expected:
        assert loop.time() < deadline, f"STATUS is {status}, expected {expected}"
        await asyncio.sleep(0.1)


async def test_many_clients_and_workers_each_client_gets_exactly_its_own_results(stack: Stack) -> None:
    workers = [
        await EchoWorker.start(stack.worker_url),
        await EchoWorker.start(stack.worker_url, concurrency=2),
        await EchoWorker.start(stack.worker_url, concurrency=2),
    ]
    clients = [await Peer.connect(stack.client_url) for _ in range(4)]
    for client in clients:
        await client.register_client()

    async def submit_and_collect(number: int, client: Peer) -> dict[str, str]:
        # Every client uses the same messageIds: results must be routed by connection, not by id alone.
        for task in range(25):
            await client.request_task(f"m{task}", f"client {number} task {task}")
        return results_by_message_id(await client.collect("RESPONSE_TASK", 25, timeout=30))

    results = await asyncio.gather(*(submit_and_collect(n, c) for n, c in enumerate(clients)))

    for number, got in enumerate(results):
        assert got == {f"m{task}": f"CLIENT {number} TASK {task}" for task in range(25)}
    for client in clients:
        # Nothing more is on its way: no duplicate, no result of another client.
        assert (await client.status())["runningTasks"] == 0
    received = [task_id for worker in workers for task_id, _ in worker.got]
    assert len(received) == len(set(received)) == 100, "a task went to two workers, or twice to one"
    assert all(worker.got for worker in workers), "some worker was never given a task"
    assert all(worker.unexpected == [] for worker in workers)


async def test_task_of_a_worker_killed_mid_task_migrates_and_the_client_gets_one_result(stack: Stack) -> None:
    doomed = await WorkerProcess.start(stack.worker_url, hold_prefix="slow")
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    await client.request_task("m1", "slow job")
    [(task_id, data)] = await doomed.wait_for_tasks(1)
    assert data == "slow job"
    survivor = await EchoWorker.start(stack.worker_url)

    await doomed.kill()

    assert await survivor.wait_for_tasks(1) == [(task_id, "slow job")]
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "SLOW JOB"}
    status = await client.status()
    assert (status["queuedTasks"], status["runningTasks"]) == (0, 0)
    assert survivor.got == [(task_id, "slow job")]


async def test_tasks_submitted_without_workers_reach_the_first_worker_in_submission_order(stack: Stack) -> None:
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    submitted = [f"task {n:02d}" for n in range(20)]
    for n, data in enumerate(submitted):
        await client.request_task(f"m{n}", data)
    assert (await client.status())["queuedTasks"] == 20

    worker = await EchoWorker.start(stack.worker_url)
    results = results_by_message_id(await client.collect("RESPONSE_TASK", 20))

    assert worker.data == submitted
    assert results == {f"m{n}": data.upper() for n, data in enumerate(submitted)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_restart_of_every_broker_process_loses_no_task_and_repeats_no_result(stack: Stack, sig: int) -> None:
    client = await Peer.connect(stack.client_url)
    await client.register_client("restarted-client")
    holder = await EchoWorker.start(stack.worker_url, concurrency=2, hold_prefix="held")
    # One task finishes and its result is delivered before the restart: it must not come again.
    await client.request_task("before", "done before")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "before", "data": "DONE BEFORE"}
    for n in range(5):
        await client.request_task(f"m{n}", f"held {n}")
    await holder.wait_for_tasks(3)
    status = await client.status()
    assert (status["queuedTasks"], status["runningTasks"]) == (3, 2)

    await asyncio.to_thread(stack.restart, sig)

    await client.expect_closed()
    await holder.wait_disconnected()
    worker = await EchoWorker.start(stack.worker_url, concurrency=2)
    await worker.wait_for_tasks(5)
    assert sorted(worker.data) == [f"held {n}" for n in range(5)]
    resumed = await Peer.connect(stack.client_url)
    await resumed.register_client("restarted-client")
    results = results_by_message_id(await resumed.collect("RESPONSE_TASK", 5))
    assert results == {f"m{n}": f"HELD {n}" for n in range(5)}
    # The dead processes' connections were released: only the two new peers are live.
    assert await resumed.status() == {
        "idleWorkers": 1,
        "busyWorkers": 0,
        "clients": 1,
        "queuedTasks": 0,
        "runningTasks": 0,
    }
    assert len(worker.got) == 5


async def test_tasks_held_on_a_killed_broker_process_reach_workers_of_the_surviving_one(
    two_process_stack: Stack,
) -> None:
    stack = two_process_stack
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    holder = await EchoWorker.start(stack.worker_url, concurrency=3, hold_prefix="")
    for n in range(3):
        await client.request_task(f"m{n}", f"task {n}")
    await holder.wait_for_tasks(3)
    # Connected before the kill, it idles until the survivor notices the silence.
    rescuer = await EchoWorker.start(stack.client_url)

    await asyncio.to_thread(stack.servers[-1].kill)

    await holder.wait_disconnected()
    results = results_by_message_id(await client.collect("RESPONSE_TASK", 3, timeout=20))
    assert results == {f"m{n}": f"TASK {n}" for n in range(3)}
    assert sorted(rescuer.data) == [f"task {n}" for n in range(3)]
    status = await client.status()
    assert (status["idleWorkers"], status["busyWorkers"], status["runningTasks"]) == (1, 0, 0)


@pytest.mark.stack_env(TURTLEMQ_MAX_FRAME_BYTES=SMALL_FRAME_LIMIT)
@pytest.mark.parametrize(
    ("bad_frame", "close_code"),
    [
        (b"\x00binary", 1003),
        ('{"type":"REQUEST_TASK","messageId":"huge","data":"' + "x" * SMALL_FRAME_LIMIT + '"}', 1009),
    ],
    ids=["binary", "oversize"],
)
async def test_bad_frame_closes_its_connection_but_keeps_its_tasks_and_spares_others(
    stack: Stack, bad_frame: bytes | str, close_code: int
) -> None:
    offender = await Peer.connect(stack.client_url)
    await offender.register_client("offender")
    await offender.request_task("kept", "kept task")
    assert (await offender.status())["queuedTasks"] == 1
    bystander = await Peer.connect(stack.client_url)
    await bystander.register_client()

    await offender.connection.send(bad_frame)

    assert await offender.expect_closed() == close_code
    # Wait until the broker has released the connection. A server that closes on its own
    # (daphne, for an oversize frame) reports it only later, and an outcome sent to the
    # connection in between is dropped by the server yet counted as delivered: a known gap.
    # What this test holds the broker to is the outcome waiting in the database.
    expected = {"idleWorkers": 0, "busyWorkers": 0, "clients": 1, "queuedTasks": 1, "runningTasks": 0}
    await poll_status(bystander, expected)
    await bystander.request_task("b1", "bystander task")
    worker = await EchoWorker.start(stack.worker_url)
    assert await bystander.recv() == {"type": "RESPONSE_TASK", "messageId": "b1", "data": "BYSTANDER TASK"}
    assert worker.data == ["kept task", "bystander task"]  # and nothing of the oversize frame
    returning = await Peer.connect(stack.client_url)
    await returning.register_client("offender")
    assert await returning.recv() == {"type": "RESPONSE_TASK", "messageId": "kept", "data": "KEPT TASK"}


async def test_status_counts_workers_and_tasks_of_every_broker_process(stack: Stack) -> None:
    # Clients and workers are on different processes of the two-process stack:
    # STATUS is answered from the database, not from one process's memory.
    first = await EchoWorker.start(stack.worker_url, hold_prefix="hold")
    second = await EchoWorker.start(stack.worker_url, hold_prefix="hold")
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    for n in range(3):
        await client.request_task(f"m{n}", f"hold {n}")
    await wait_until(lambda: len(first.got) + len(second.got) == 2, what="both workers to hold a task")
    assert await client.status() == {
        "idleWorkers": 0,
        "busyWorkers": 2,
        "clients": 1,
        "queuedTasks": 1,
        "runningTasks": 2,
    }

    await second.close()

    # The close is handled on the other process in its own time: poll.
    expected = {"idleWorkers": 0, "busyWorkers": 1, "clients": 1, "queuedTasks": 2, "runningTasks": 1}
    await poll_status(client, expected)
    third = await EchoWorker.start(stack.worker_url, hold_prefix="hold")
    await third.wait_for_tasks(1)
    assert third.data == second.data, "the released task went back to the head of the queue"
    await poll_status(client, {**expected, "busyWorkers": 2, "queuedTasks": 1, "runningTasks": 2})


async def test_each_of_many_tasks_runs_exactly_once_across_broker_processes(two_process_stack: Stack) -> None:
    stack = two_process_stack
    workers = [await WorkerProcess.start(stack.worker_url, concurrency=concurrency) for concurrency in (1, 1, 2, 2)]
    clients = [await Peer.connect(stack.client_url) for _ in range(3)]
    for client in clients:
        await client.register_client()

    async def submit_and_collect(number: int, client: Peer) -> dict[str, str]:
        for task in range(100):
            await client.request_task(f"m{task}", f"c{number} t{task}")
        return results_by_message_id(await client.collect("RESPONSE_TASK", 100, timeout=60))

    results = await asyncio.gather(*(submit_and_collect(n, c) for n, c in enumerate(clients)))
    for worker in workers:
        await worker.stop()

    for number, got in enumerate(results):
        assert got == {f"m{task}": f"C{number} T{task}" for task in range(100)}
    executed = Counter(data for worker in workers for _, data in worker.got)
    assert [data for data, times in executed.items() if times != 1] == [], "a task ran more than once"
    assert len(executed) == 300
