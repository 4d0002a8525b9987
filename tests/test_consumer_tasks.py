"""The task part of PROTOCOL.md, rule by rule, through the consumer in-process (WebsocketCommunicator).

Each test talks to ``turtlemq_site.asgi.application`` as clients and workers
would. Where a test claims that something did *not* happen, the database says
so for certain and a short quiet period backs it up on the wire.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from broker.models import Connection, Task
from tests.communicators import TIMEOUT, Peer, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fast_housekeeping(settings):
    """Housekeeping (lease expiry, due retries) every 50 ms instead of every second."""
    settings.TURTLEMQ_TICK = 0.05
    settings.TURTLEMQ_RETRY_BACKOFF = 0.05
    return settings


@database_sync_to_async
def tasks() -> list[dict[str, Any]]:
    return list(Task.objects.order_by("pk").values())


@database_sync_to_async
def connections() -> list[dict[str, Any]]:
    return list(Connection.objects.order_by("pk").values())


@database_sync_to_async
def task_row(task_id: str) -> dict[str, Any]:
    return Task.objects.filter(pk=int(task_id)).values().get()


def task_is(task_id: str, state: str) -> bool:
    return Task.objects.filter(pk=int(task_id), state=state).exists()


async def still_usable(peer: Peer) -> None:
    """The connection answers a valid frame after an error."""
    status = await peer.status()
    assert "idleWorkers" in status


# --- registration ---------------------------------------------------------------------


async def test_register_client_is_echoed_with_the_same_frame(peers):
    peer = await peers.connect()
    await peer.send({"type": "REGISTER_CLIENT", "data": ""})
    assert await peer.recv() == {"type": "REGISTER_CLIENT", "data": ""}


async def test_register_worker_is_echoed_with_the_same_frame(peers):
    peer = await peers.connect()
    await peer.send({"type": "REGISTER_WORKER", "data": ""})
    assert await peer.recv() == {"type": "REGISTER_WORKER", "data": ""}


async def test_registration_echo_repeats_the_optional_fields_too(peers):
    client, worker = await peers.connect(), await peers.connect()
    await client.send({"type": "REGISTER_CLIENT", "data": "", "clientId": "billing"})
    assert await client.recv() == {"type": "REGISTER_CLIENT", "data": "", "clientId": "billing"}
    await worker.send({"type": "REGISTER_WORKER", "data": "", "concurrency": 3})
    assert await worker.recv() == {"type": "REGISTER_WORKER", "data": "", "concurrency": 3}


async def test_protocol_is_served_at_root_and_at_ws(peers):
    worker = await peers.connect("/")
    await worker.register_worker()
    client = await peers.connect("/ws/")
    await client.register_client()
    await client.submit("m1", "across paths")
    task = await worker.next_task()
    await worker.respond(task, "done")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "done"}


# --- routing, queueing and the choice of worker -------------------------------------------


async def test_each_result_is_routed_to_the_client_that_submitted_the_task(peers):
    worker_a, worker_b = await peers.worker(), await peers.worker()
    alice, bob = await peers.client(), await peers.client()
    await alice.submit("same-id", "from alice")
    first = await worker_a.next_task()
    await bob.submit("same-id", "from bob")
    second = await worker_b.next_task()
    assert first["data"] == "from alice" and second["data"] == "from bob"
    assert first["taskId"] != second["taskId"]

    # Answer in the opposite order: routing follows the task, not the timing.
    await worker_b.respond(second, "for bob")
    await worker_a.respond(first, "for alice")
    assert await bob.recv() == {"type": "RESPONSE_TASK", "messageId": "same-id", "data": "for bob"}
    assert await alice.recv() == {"type": "RESPONSE_TASK", "messageId": "same-id", "data": "for alice"}
    await alice.assert_silent()
    await bob.assert_silent()


async def test_tasks_wait_in_a_fifo_queue_while_no_worker_is_connected(peers):
    client = await peers.client()
    for n in range(5):
        await client.submit(f"m{n}", f"task {n}")
    await wait_until(lambda: Task.objects.queued().count() == 5, what="five queued tasks")

    worker = await peers.worker()
    for n in range(5):
        task = await worker.next_task()
        assert task["data"] == f"task {n}"
        await worker.respond(task, f"result {n}")
        assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": f"m{n}", "data": f"result {n}"}


async def test_longest_idle_worker_gets_the_next_task(peers):
    first, second, third = await peers.worker(), await peers.worker(), await peers.worker()
    client = await peers.client()

    await client.submit("m1", "a")
    task = await first.next_task()  # registered first: idle longest
    await first.respond(task, "ra")
    await client.expect("RESPONSE_TASK")

    # The first worker was busy a moment ago; the other two have waited longer.
    await client.submit("m2", "b")
    assert (await second.next_task())["data"] == "b"
    await client.submit("m3", "c")
    assert (await third.next_task())["data"] == "c"
    await client.submit("m4", "d")
    assert (await first.next_task())["data"] == "d"


async def test_a_busy_worker_gets_no_second_task(peers):
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    task = await worker.next_task()
    await client.submit("m2", "b")
    await wait_until(lambda: Task.objects.queued().filter(message_id="m2").exists(), what="m2 queued")
    await worker.assert_silent()

    await worker.respond(task, "ra")
    assert (await worker.next_task())["data"] == "b"


async def test_worker_with_concurrency_two_holds_two_tasks_at_once_never_three(peers):
    worker = await peers.worker(concurrency=2)
    client = await peers.client()
    for n in range(3):
        await client.submit(f"m{n}", f"task {n}")
    first, second = await worker.next_task(), await worker.next_task()
    assert [first["data"], second["data"]] == ["task 0", "task 1"]
    await wait_until(lambda: Task.objects.queued().filter(message_id="m2").exists(), what="m2 queued")
    await worker.assert_silent()
    assert [c["in_flight"] for c in await connections() if c["role"] == "worker"] == [2]

    await worker.respond(second, "r1")
    assert (await worker.next_task())["data"] == "task 2"
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r1"}


# --- migration -----------------------------------------------------------------------------


async def test_task_of_a_worker_that_disconnects_goes_to_the_next_idle_worker(peers):
    leaving, staying = await peers.worker(), await peers.worker()
    client = await peers.client()
    await client.submit("m1", "migrate me")
    task = await leaving.next_task()

    await leaving.close()
    again = await staying.next_task()
    assert again == task
    await staying.respond(again, "done once")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "done once"}
    await client.assert_silent()
    row = await task_row(task["taskId"])
    assert (row["state"], row["attempts"]) == ("done", 2)


async def test_task_of_a_worker_that_disconnects_waits_at_the_head_of_the_queue(peers):
    leaving = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "first")
    await leaving.next_task()
    await client.submit("m2", "second")
    await wait_until(lambda: Task.objects.queued().count() == 1, what="m2 queued")

    await leaving.close()
    await wait_until(lambda: Task.objects.queued().count() == 2, what="m1 back in the queue")
    newcomer = await peers.worker()
    assert (await newcomer.next_task())["data"] == "first"


# --- RESPONSE_TASK, FAIL_TASK, TOUCH_TASK with the wrong taskId ---------------------------------


@pytest.mark.parametrize("wrong_id", ["999999", "not-a-number", "99999999999999999999999", "-1"])
async def test_response_with_a_wrong_task_id_is_unknown_task_and_the_real_task_is_sent_again(peers, wrong_id):
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "the real one")
    task = await worker.next_task()

    await worker.send({"type": "RESPONSE_TASK", "taskId": wrong_id, "data": "misdirected"})
    await worker.expect_error("UNKNOWN_TASK", {"type": "RESPONSE_TASK", "taskId": wrong_id})
    assert await worker.next_task() == task
    assert await task_is_still_assigned(task)

    await worker.respond(task, "right")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "right"}
    await client.assert_silent()


async def task_is_still_assigned(task: dict[str, Any]) -> bool:
    return (await task_row(task["taskId"]))["state"] == "assigned"


async def test_response_from_a_worker_holding_nothing_is_unknown_task_and_changes_nothing(peers):
    idle = await peers.worker()
    busy = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    # The idle worker takes m1 first; let it finish so that it holds nothing again.
    task = await idle.next_task()
    await idle.respond(task, "ra")
    await client.expect("RESPONSE_TASK")
    await client.submit("m2", "b")
    held = await busy.next_task()
    before = (await tasks(), await connections())

    await idle.send({"type": "RESPONSE_TASK", "taskId": held["taskId"], "data": "stolen"})
    await idle.expect_error("UNKNOWN_TASK", {"type": "RESPONSE_TASK", "taskId": held["taskId"]})
    await idle.send({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "twice"})
    await idle.expect_error("UNKNOWN_TASK", {"type": "RESPONSE_TASK", "taskId": task["taskId"]})
    await still_usable(idle)
    assert (await tasks(), await connections()) == before
    await idle.assert_silent()
    await client.assert_silent()

    await busy.respond(held, "rb")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m2", "data": "rb"}


async def test_fail_task_with_a_wrong_task_id_is_unknown_task_and_the_real_task_is_sent_again(peers):
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    task = await worker.next_task()
    await worker.send({"type": "FAIL_TASK", "taskId": "424242", "data": "oops"})
    await worker.expect_error("UNKNOWN_TASK", {"type": "FAIL_TASK", "taskId": "424242"})
    assert await worker.next_task() == task
    row = await task_row(task["taskId"])
    assert (row["state"], row["failures"]) == ("assigned", 0)


async def test_touch_task_with_an_unknown_task_id_is_unknown_task(peers):
    worker = await peers.worker()
    await worker.send({"type": "TOUCH_TASK", "taskId": "777"})
    await worker.expect_error("UNKNOWN_TASK", {"type": "TOUCH_TASK", "taskId": "777"})
    await still_usable(worker)


# --- failures, retries, leases -----------------------------------------------------------------


async def test_failed_task_is_retried_with_backoff_then_reported_as_task_failed(peers, fast_housekeeping):
    fast_housekeeping.TURTLEMQ_RETRY_BACKOFF = 0.2
    fast_housekeeping.TURTLEMQ_MAX_ATTEMPTS = 3
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "flaky")

    task = await worker.next_task()
    for attempt, backoff in ((1, 0.2), (2, 0.4)):
        failed_at = time.monotonic()
        await worker.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": f"boom {attempt}"})
        assert await worker.next_task() == task
        # The retry waited at least its backoff, which doubles each time.
        assert time.monotonic() - failed_at >= backoff * 0.95
    await worker.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "boom 3"})

    assert await client.recv() == {"type": "TASK_FAILED", "messageId": "m1", "data": "boom 3"}
    row = await task_row(task["taskId"])
    assert (row["state"], row["attempts"], row["failures"]) == ("failed", 3, 3)
    await worker.assert_silent()
    await client.assert_silent()


async def test_max_attempts_of_one_task_overrides_the_default_limit(peers, fast_housekeeping):
    fast_housekeeping.TURTLEMQ_MAX_ATTEMPTS = 3
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("once", "a", maxAttempts=1)
    task = await worker.next_task()
    await worker.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "no luck"})
    assert await client.recv() == {"type": "TASK_FAILED", "messageId": "once", "data": "no luck"}
    await worker.assert_silent()


async def test_max_attempts_of_one_task_may_be_above_the_default_limit(peers, fast_housekeeping):
    fast_housekeeping.TURTLEMQ_MAX_ATTEMPTS = 1
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("twice", "a", maxAttempts=2)
    task = await worker.next_task()
    await worker.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "first"})
    assert await worker.next_task() == task
    await worker.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "second"})
    assert await client.recv() == {"type": "TASK_FAILED", "messageId": "twice", "data": "second"}


async def test_task_failed_after_retries_goes_to_its_client_even_when_another_worker_retried_it(
    peers, fast_housekeeping
):
    fast_housekeeping.TURTLEMQ_MAX_ATTEMPTS = 2
    first, second = await peers.worker(), await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    task = await first.next_task()
    await first.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "first failed"})
    # The second worker has been idle longer than the first, which just failed.
    assert await second.next_task() == task
    await second.respond(task, "second succeeded")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "second succeeded"}


async def test_task_of_a_silent_worker_is_taken_back_when_its_lease_expires(peers, fast_housekeeping):
    silent, other = await peers.worker(), await peers.worker()
    client = await peers.client()
    await client.submit("m1", "slow", timeout=0.3)
    task = await silent.next_task()

    # The silent worker never answers in time: the task goes to the other one.
    assert await other.next_task() == task
    await silent.respond(task, "late")
    await silent.expect_error("UNKNOWN_TASK", {"type": "RESPONSE_TASK", "taskId": task["taskId"]})
    await other.respond(task, "on time")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "on time"}
    await client.assert_silent()
    assert (await task_row(task["taskId"]))["result"] == "on time"


async def test_touch_task_renews_the_lease_of_a_long_task(peers, fast_housekeeping):
    busy, other = await peers.worker(), await peers.worker()
    client = await peers.client()
    await client.submit("m1", "long", timeout=0.5)
    task = await busy.next_task()
    started = time.monotonic()
    # Work for three times the lease, touching the task well within each lease.
    while time.monotonic() - started < 1.5:
        await busy.send({"type": "TOUCH_TASK", "taskId": task["taskId"]})
        await busy.assert_silent(0.15)
    await busy.respond(task, "finished")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "finished"}
    await other.assert_silent()
    assert (await task_row(task["taskId"]))["attempts"] == 1


# --- STATUS ---------------------------------------------------------------------------------


async def test_status_counts_idle_and_busy_workers_and_queued_and_running_tasks(peers):
    observer = await peers.connect()
    assert await observer.status() == {
        "idleWorkers": 0,
        "busyWorkers": 0,
        "clients": 0,
        "queuedTasks": 0,
        "runningTasks": 0,
    }
    first = await peers.worker()
    client = await peers.client()
    for n in range(3):
        await client.submit(f"m{n}", "x")
    task = await first.next_task()
    await wait_until(lambda: Task.objects.queued().count() == 2, what="two queued tasks")
    assert await observer.status() == {
        "idleWorkers": 0,
        "busyWorkers": 1,
        "clients": 1,
        "queuedTasks": 2,
        "runningTasks": 1,
    }

    second = await peers.worker(concurrency=2)
    held = [await second.next_task(), await second.next_task()]
    idle = await peers.worker()
    status = await idle.status()
    assert status == {"idleWorkers": 1, "busyWorkers": 2, "clients": 1, "queuedTasks": 0, "runningTasks": 3}

    for worker, done in ((first, task), (second, held[0]), (second, held[1])):
        await worker.respond(done, "r")
        await client.expect("RESPONSE_TASK")
    assert await client.status() == {
        "idleWorkers": 3,
        "busyWorkers": 0,
        "clients": 1,
        "queuedTasks": 0,
        "runningTasks": 0,
    }


# --- clientId: resume and idempotency -------------------------------------------------------------


async def test_client_resuming_with_its_client_id_gets_results_that_finished_while_away(peers):
    worker = await peers.worker(concurrency=2)
    client = await peers.client("app")
    await client.submit("m1", "a")
    await client.submit("m2", "b")
    first, second = await worker.next_task(), await worker.next_task()
    await client.close()

    await worker.respond(second, "rb")
    await wait_until(lambda: task_is(second["taskId"], "done"), what="m2 done")
    await worker.respond(first, "ra")
    await wait_until(lambda: task_is(first["taskId"], "done"), what="m1 done")

    back = await peers.connect()
    await back.send({"type": "REGISTER_CLIENT", "data": "", "clientId": "app"})
    assert await back.recv() == {"type": "REGISTER_CLIENT", "data": "", "clientId": "app"}
    assert await back.recv() == {"type": "RESPONSE_TASK", "messageId": "m2", "data": "rb"}
    assert await back.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "ra"}
    await back.assert_silent()


async def test_results_resumed_with_a_client_id_are_sent_only_once(peers):
    worker = await peers.worker()
    client = await peers.client("app")
    await client.submit("m1", "a")
    task = await worker.next_task()
    await client.close()
    await worker.respond(task, "ra")
    await wait_until(lambda: task_is(task["taskId"], "done"), what="m1 done")

    back = await peers.client("app")
    assert await back.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "ra"}
    await back.close()
    again = await peers.client("app")
    await again.assert_silent()
    assert (await task_row(task["taskId"]))["delivered_at"] is not None


async def test_result_for_a_connection_the_broker_is_closing_is_kept_for_resume(peers):
    """Between the broker's close and the server's word that the socket is gone, nothing sent arrives.

    An outcome sent in that window would be dropped by the server and yet
    recorded as delivered: lost to the client for good.
    """
    worker = await peers.worker()
    client = await peers.client("app")
    await client.submit("m1", "a")
    task = await worker.next_task()
    await client.send_bytes(b"binary")  # refused: the broker closes the connection
    output = await client.communicator.receive_output(TIMEOUT)
    assert output["type"] == "websocket.close"

    # The server has not reported the socket closed yet (no websocket.disconnect).
    await worker.respond(task, "ra")
    await wait_until(lambda: task_is(task["taskId"], "done"), what="m1 done")
    await client.assert_silent()
    await client.close()
    assert (await task_row(task["taskId"]))["delivered_at"] is None

    back = await peers.client("app")
    assert await back.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "ra"}


async def test_result_delivered_live_is_not_sent_again_on_resume(peers):
    worker = await peers.worker()
    client = await peers.client("app")
    await client.submit("m1", "a")
    await worker.respond(await worker.next_task(), "ra")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "ra"}
    await client.close()

    back = await peers.client("app")
    await back.assert_silent()


async def test_task_in_flight_when_its_client_left_is_answered_on_the_new_connection(peers):
    worker = await peers.worker()
    client = await peers.client("app")
    await client.submit("m1", "a")
    task = await worker.next_task()
    await client.close()

    back = await peers.client("app")
    await worker.respond(task, "ra")
    assert await back.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "ra"}
    await back.assert_silent()


async def test_repeated_message_id_of_a_task_in_flight_creates_no_second_task(peers):
    worker = await peers.worker(concurrency=2)
    client = await peers.client("app")
    await client.submit("m1", "once")
    task = await worker.next_task()
    await client.submit("m1", "once")
    await client.status()  # frames of one connection are handled in order
    assert len(await tasks()) == 1
    await worker.assert_silent()

    await worker.respond(task, "r1")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r1"}
    await client.assert_silent()


async def test_repeated_message_id_of_a_queued_task_creates_no_second_task(peers):
    client = await peers.client("app")
    await client.submit("m1", "once")
    await client.submit("m1", "once")
    assert (await client.status())["queuedTasks"] == 1

    worker = await peers.worker()
    await worker.respond(await worker.next_task(), "r1")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r1"}
    await worker.assert_silent()
    await client.assert_silent()


async def test_repeated_message_id_of_a_finished_task_gets_the_stored_result_again(peers):
    worker = await peers.worker()
    client = await peers.client("app")
    await client.submit("m1", "a")
    await worker.respond(await worker.next_task(), "stored")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "stored"}

    await client.submit("m1", "a")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "stored"}
    await worker.assert_silent()
    assert len(await tasks()) == 1


async def test_repeated_message_id_of_a_failed_task_gets_task_failed_again(peers):
    worker = await peers.worker()
    client = await peers.client("app")
    await client.submit("m1", "a", maxAttempts=1)
    task = await worker.next_task()
    await worker.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "broken"})
    assert await client.recv() == {"type": "TASK_FAILED", "messageId": "m1", "data": "broken"}

    await client.submit("m1", "a")
    assert await client.recv() == {"type": "TASK_FAILED", "messageId": "m1", "data": "broken"}
    await worker.assert_silent()


async def test_message_ids_are_deduplicated_per_client_id_only(peers):
    worker = await peers.worker(concurrency=2)
    first, second = await peers.client("first"), await peers.client("second")
    await first.submit("m1", "from first")
    await second.submit("m1", "from second")
    got = {(await worker.next_task())["data"], (await worker.next_task())["data"]}
    assert got == {"from first", "from second"}


async def test_anonymous_client_repeating_a_message_id_gets_a_task_for_each_request(peers):
    worker = await peers.worker(concurrency=2)
    client = await peers.client()
    await client.submit("m1", "a")
    await client.submit("m1", "a")
    first, second = await worker.next_task(), await worker.next_task()
    assert first["taskId"] != second["taskId"]
    await worker.respond(first, "r1")
    await worker.respond(second, "r2")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r1"}
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r2"}


async def test_anonymous_results_are_not_kept_for_anyone_else(peers):
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    task = await worker.next_task()
    await client.close()
    await worker.respond(task, "ra")
    await wait_until(lambda: task_is(task["taskId"], "done"), what="m1 done")

    other = await peers.client()
    await other.assert_silent()


# --- registration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "REQUEST_TASK", "messageId": "m1", "data": "x"},
        {"type": "RESPONSE_TASK", "taskId": "1", "data": "x"},
        {"type": "FAIL_TASK", "taskId": "1", "data": "x"},
        {"type": "TOUCH_TASK", "taskId": "1"},
    ],
    ids=lambda frame: frame["type"],
)
async def test_task_frame_before_registration_is_not_registered(peers, frame):
    peer = await peers.connect()
    await peer.send(frame)
    ref = {key: value for key, value in frame.items() if key in ("type", "messageId", "taskId")}
    await peer.expect_error("NOT_REGISTERED", ref)
    await still_usable(peer)
    assert await tasks() == []
    await peer.register_client()  # and it may still register


async def test_request_task_from_a_worker_is_wrong_role(peers):
    worker = await peers.worker()
    await worker.submit("m1", "x")
    await worker.expect_error("WRONG_ROLE", {"type": "REQUEST_TASK", "messageId": "m1"})
    await still_usable(worker)
    assert await tasks() == []


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "RESPONSE_TASK", "taskId": "1", "data": "x"},
        {"type": "FAIL_TASK", "taskId": "1", "data": "x"},
        {"type": "TOUCH_TASK", "taskId": "1"},
    ],
    ids=lambda frame: frame["type"],
)
async def test_worker_frames_from_a_client_are_wrong_role(peers, frame):
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "x")
    task = await worker.next_task()
    await client.send({**frame, "taskId": task["taskId"]})
    await client.expect_error("WRONG_ROLE", {"type": frame["type"], "taskId": task["taskId"]})
    assert await task_is_still_assigned(task)
    await worker.respond(task, "r")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r"}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("REGISTER_CLIENT", "REGISTER_CLIENT"),
        ("REGISTER_CLIENT", "REGISTER_WORKER"),
        ("REGISTER_WORKER", "REGISTER_WORKER"),
        ("REGISTER_WORKER", "REGISTER_CLIENT"),
    ],
)
async def test_second_registration_is_already_registered_and_keeps_the_first_role(peers, first, second):
    peer = await peers.connect()
    await peer.send({"type": first, "data": ""})
    await peer.expect(first)
    await peer.send({"type": second, "data": ""})
    await peer.expect_error("ALREADY_REGISTERED", {"type": second})
    assert [c["role"] for c in await connections()] == [first.removeprefix("REGISTER_").lower()]
    status = await peer.status()
    assert status["clients"] + status["idleWorkers"] == 1


# --- malformed frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["not json", '{"type": "REQUEST_TASK",', "", "{'type': 'STATUS'}"])
async def test_text_that_is_not_json_is_bad_json_with_empty_ref(peers, text):
    client = await peers.client()
    await client.send_text(text)
    await client.expect_error("BAD_JSON", {})
    await still_usable(client)


BAD_FRAMES = [
    ("array", ["REQUEST_TASK"], {}, "client"),
    ("string", "REQUEST_TASK", {}, "client"),
    ("no type", {"messageId": "m1", "data": "x"}, {"messageId": "m1"}, "client"),
    ("number type", {"type": 3, "messageId": "m1"}, {"type": 3, "messageId": "m1"}, "client"),
    ("null type", {"type": None, "messageId": "m1"}, {"messageId": "m1"}, "client"),
    ("empty messageId", {"type": "REQUEST_TASK", "messageId": "", "data": "x"}, None, "client"),
    ("long messageId", {"type": "REQUEST_TASK", "messageId": "m" * 257, "data": "x"}, None, "client"),
    ("number messageId", {"type": "REQUEST_TASK", "messageId": 1, "data": "x"}, None, "client"),
    ("no messageId", {"type": "REQUEST_TASK", "data": "x"}, None, "client"),
    ("number data", {"type": "REQUEST_TASK", "messageId": "m1", "data": 5}, None, "client"),
    ("object data", {"type": "REQUEST_TASK", "messageId": "m1", "data": {"a": 1}}, None, "client"),
    ("no data", {"type": "REQUEST_TASK", "messageId": "m1"}, None, "client"),
    ("bad timeout", {"type": "REQUEST_TASK", "messageId": "m1", "data": "x", "timeout": -1}, None, "client"),
    ("bad maxAttempts", {"type": "REQUEST_TASK", "messageId": "m1", "data": "x", "maxAttempts": 0}, None, "client"),
    ("response without taskId", {"type": "RESPONSE_TASK", "data": "x"}, None, "worker"),
    ("response with number data", {"type": "RESPONSE_TASK", "taskId": "1", "data": 1}, None, "worker"),
    ("string concurrency", {"type": "REGISTER_WORKER", "data": "", "concurrency": "2"}, None, "anonymous"),
    ("float concurrency", {"type": "REGISTER_WORKER", "data": "", "concurrency": 1.5}, None, "anonymous"),
    ("zero concurrency", {"type": "REGISTER_WORKER", "data": "", "concurrency": 0}, None, "anonymous"),
    ("huge concurrency", {"type": "REGISTER_WORKER", "data": "", "concurrency": 10**6}, None, "anonymous"),
    ("empty clientId", {"type": "REGISTER_CLIENT", "data": "", "clientId": ""}, None, "anonymous"),
]


@pytest.mark.parametrize(("frame", "ref", "role"), [case[1:] for case in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES])
async def test_malformed_frame_is_bad_frame_with_its_ref_and_the_connection_stays_usable(peers, frame, ref, role):
    if role == "client":
        peer = await peers.client()
    elif role == "worker":
        peer = await peers.worker()
    else:
        peer = await peers.connect()
    if ref is None:
        ref = {key: frame[key] for key in ("type", "messageId", "taskId") if key in frame}
        if isinstance(ref.get("messageId"), str) and len(ref["messageId"]) > 256:
            ref["messageId"] = ref["messageId"][:256] + "..."
    await peer.send(frame)
    await peer.expect_error("BAD_FRAME", ref)
    assert await tasks() == []
    await still_usable(peer)
    if role == "anonymous":
        # A refused registration registers nothing: the connection may register properly.
        assert await connections() == []
        await peer.register_worker()


async def test_unknown_type_is_refused_with_its_ref(peers):
    client = await peers.client()
    await client.send({"type": "CANCEL_TASK", "messageId": "m1"})
    await client.expect_error("UNKNOWN_TYPE", {"type": "CANCEL_TASK", "messageId": "m1"})
    await client.send({"type": "request_task", "messageId": "m2", "data": "x"})
    await client.expect_error("UNKNOWN_TYPE", {"type": "request_task", "messageId": "m2"})
    await still_usable(client)


async def test_connection_stays_usable_for_tasks_after_every_kind_of_error(peers):
    worker = await peers.worker()
    client = await peers.client()
    await client.send_text("{")
    await client.expect_error("BAD_JSON")
    await client.send({"type": "REQUEST_TASK", "messageId": ""})
    await client.expect_error("BAD_FRAME")
    await client.send({"type": "NOPE"})
    await client.expect_error("UNKNOWN_TYPE")
    await client.send({"type": "REGISTER_WORKER", "data": ""})
    await client.expect_error("ALREADY_REGISTERED")
    await client.send({"type": "RESPONSE_TASK", "taskId": "1", "data": "x"})
    await client.expect_error("WRONG_ROLE")

    await client.submit("m1", "still works")
    task = await worker.next_task()
    await worker.send({"type": "RESPONSE_TASK", "taskId": "0", "data": "x"})
    await worker.expect_error("UNKNOWN_TASK")
    assert await worker.next_task() == task
    await worker.respond(task, "yes")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "yes"}


# --- frames that close the connection ------------------------------------------------------------------


async def test_binary_frame_closes_the_connection_with_1003(peers):
    client = await peers.client()
    await client.send_bytes(b'{"type":"STATUS"}')
    assert await client.expect_close() == 1003


async def test_oversize_frame_closes_with_1009_and_the_task_submitted_before_is_not_lost(peers, settings):
    settings.TURTLEMQ_MAX_FRAME_BYTES = 1000
    client = await peers.client()
    await client.submit("kept", "small")
    await client.status()  # the task is stored before the next frame is read
    await client.submit("too-big", "x" * 1000)
    assert await client.expect_close() == 1009

    worker = await peers.worker()
    task = await worker.next_task()
    assert task["data"] == "small"
    assert [t["message_id"] for t in await tasks()] == ["kept"]


async def test_frame_limit_counts_bytes_not_characters(peers, settings):
    settings.TURTLEMQ_MAX_FRAME_BYTES = 1000
    client = await peers.client()
    await client.submit("fits", "é" * 450)  # about 950 bytes
    assert (await client.status())["queuedTasks"] == 1
    await client.submit("too-big", "é" * 550)  # about 550 characters but 1150 bytes
    assert await client.expect_close() == 1009


async def test_errors_and_closes_on_one_connection_do_not_disturb_another(peers, settings):
    settings.TURTLEMQ_MAX_FRAME_BYTES = 1000
    worker = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    task = await worker.next_task()

    vandal = await peers.connect()
    await vandal.send_text("{oops")
    await vandal.expect_error("BAD_JSON")
    await vandal.send({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "forged"})
    await vandal.expect_error("NOT_REGISTERED")
    await vandal.register_worker()
    await vandal.send({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "forged"})
    await vandal.expect_error("UNKNOWN_TASK")
    await vandal.send_text("x" * 2000)
    assert await vandal.expect_close() == 1009
    rude = await peers.client()
    await rude.send_bytes(b"\x00\x01")
    assert await rude.expect_close() == 1003

    await worker.respond(task, "genuine")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "genuine"}
    await client.submit("m2", "b")
    await worker.respond(await worker.next_task(), "rb")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m2", "data": "rb"}
    await client.assert_silent()


async def test_task_of_a_worker_closed_for_a_binary_frame_goes_to_another_worker(peers):
    rude, polite = await peers.worker(), await peers.worker()
    client = await peers.client()
    await client.submit("m1", "a")
    task = await rude.next_task()
    await rude.send_bytes(b"result")
    assert await rude.expect_close() == 1003
    assert await polite.next_task() == task
    await polite.respond(task, "r")
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "r"}


async def test_a_layer_event_the_connection_cannot_handle_closes_it_with_1011_and_spares_the_others(peers):
    broken, other = await peers.worker(), await peers.client()
    channel = await database_sync_to_async(lambda: Connection.objects.get(role=Connection.Role.WORKER).channel_name)()
    await get_channel_layer().send(channel, {"type": "no.such.event"})
    assert await broken.expect_close() == 1011
    await other.submit("m1", "still served")
    survivor = await peers.worker()
    assert (await survivor.next_task())["data"] == "still served"


async def test_task_events_from_the_layer_reach_a_connection_while_it_reads_frames(peers):
    """A task announced by another process arrives as a layer event, beside the connection's own frames."""
    worker = await peers.worker()
    channel = await database_sync_to_async(lambda: Connection.objects.get().channel_name)()
    await get_channel_layer().send(channel, {"type": "task.assign", "task_id": "99", "data": "from afar"})
    assert await worker.next_task() == {"type": "REQUEST_TASK", "taskId": "99", "data": "from afar"}
    assert (await worker.status())["idleWorkers"] == 1  # the database gave it nothing: a stray doorbell
