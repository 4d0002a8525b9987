"""The management commands ``requeue_orphans`` and ``purge_tasks``, run through ``call_command``.

The data is made the way the broker makes it (``broker.dispatch``); only the
ways a broker can vanish without cleaning up (SIGKILL, a crash half way) are
written into the rows directly.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.management import CommandError, call_command
from django.utils import timezone

from broker import dispatch
from broker.durations import parse_duration
from broker.models import BrokerProcess, Connection, Task
from tests.services import REDIS_URL

pytestmark = pytest.mark.django_db

IN_MEMORY_LAYER = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def new_process() -> int:
    # One host name per process: register_process reaps processes of its own
    # host whose pid is gone, and the test means to choose what dies.
    process_id, _ = dispatch.register_process(f"host-{uuid.uuid4().hex[:8]}", os.getpid())
    return process_id


def busy_worker(process_id: int, data: str) -> tuple[int, int]:
    """A worker of ``process_id`` holding a task with ``data`` (the only free worker): (connection, task)."""
    registration = dispatch.register_worker(process_id, f"worker.{uuid.uuid4().hex}", 1)
    effects = dispatch.submit_task("client.reply", None, f"m-{data}", data)
    (assignment,) = effects.assignments
    return registration.connection_id, int(assignment.task_id)


def state_of(task_id: int) -> str:
    return Task.objects.get(pk=task_id).state


# --- requeue_orphans ------------------------------------------------------------------


def test_tasks_of_a_silent_process_a_stopped_process_and_a_closed_connection_go_back_to_the_queue(settings):
    settings.CHANNEL_LAYERS = IN_MEMORY_LAYER
    killed, stopped, crashed, healthy = new_process(), new_process(), new_process(), new_process()
    _, of_killed = busy_worker(killed, "a")
    _, of_stopped = busy_worker(stopped, "b")
    closed_worker, of_closed = busy_worker(crashed, "c")
    healthy_worker, of_healthy = busy_worker(healthy, "d")
    # SIGKILL: the heartbeat stops. A crash half way: stopped, or closed, without releasing.
    silent_since = timezone.now() - timedelta(seconds=settings.TURTLEMQ_PROCESS_DEAD_AFTER + 60)
    BrokerProcess.objects.filter(pk=killed).update(heartbeat_at=silent_since)
    BrokerProcess.objects.filter(pk=stopped).update(stopped_at=timezone.now())
    Connection.objects.filter(pk=closed_worker).update(disconnected_at=timezone.now())

    output = run("requeue_orphans")

    assert "3 orphaned tasks went back to the queue." in output
    for task_id in (of_killed, of_stopped, of_closed):
        task = Task.objects.get(pk=task_id)
        assert (task.state, task.worker_id) == (Task.State.QUEUED, None)
    assert Task.objects.get(pk=of_healthy).state == Task.State.ASSIGNED
    assert Task.objects.get(pk=of_healthy).worker_id == healthy_worker
    assert BrokerProcess.objects.get(pk=killed).stopped_at is not None
    assert not Connection.objects.live().filter(process_id__in=[killed, stopped]).exists()
    assert Connection.objects.get(pk=closed_worker).in_flight == 0
    assert Connection.objects.get(pk=healthy_worker).in_flight == 1


def test_requeue_orphans_leaves_a_healthy_broker_alone():
    _, task_id = busy_worker(new_process(), "x")
    dispatch.submit_task("client.reply", None, "queued", "waits for a worker")

    assert "0 orphaned tasks went back to the queue." in run("requeue_orphans")
    assert state_of(task_id) == Task.State.ASSIGNED
    assert Task.objects.queued().count() == 1


def test_with_a_layer_that_ends_at_this_process_orphans_wait_for_the_broker_to_hand_them_out(settings):
    settings.CHANNEL_LAYERS = IN_MEMORY_LAYER
    process = new_process()
    closed_worker, task_id = busy_worker(process, "x")
    Connection.objects.filter(pk=closed_worker).update(disconnected_at=timezone.now())
    idle = dispatch.register_worker(process, "worker.idle", 1).connection_id

    output = run("requeue_orphans")

    # The idle worker lives in another process: it could never be told.
    assert "1 orphaned task went back to the queue." in output
    assert state_of(task_id) == Task.State.QUEUED
    assert Connection.objects.get(pk=idle).in_flight == 0


def test_over_a_shared_channel_layer_an_orphan_goes_straight_to_an_idle_worker(settings):
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError:
        from tests.e2e.servers import service_missing

        service_missing(f"Redis ({REDIS_URL})")
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"turtlemq-test-{uuid.uuid4().hex}"},
        }
    }
    process = new_process()
    closed_worker, task_id = busy_worker(process, "the orphan")
    Connection.objects.filter(pk=closed_worker).update(disconnected_at=timezone.now())
    idle_channel = f"worker.idle.{uuid.uuid4().hex}"
    idle = dispatch.register_worker(process, idle_channel, 1).connection_id

    output = run("requeue_orphans")

    assert "1 orphaned task went back to the queue." in output
    assert "1 of them went straight to idle workers." in output
    task = Task.objects.get(pk=task_id)
    assert (task.state, task.worker_id) == (Task.State.ASSIGNED, idle)
    event = async_to_sync(_receive)(idle_channel)
    assert event == {"type": "task.assign", "task_id": str(task_id), "data": "the orphan"}


async def _receive(channel: str) -> dict:
    return await asyncio.wait_for(get_channel_layer().receive(channel), timeout=10)


# --- purge_tasks ------------------------------------------------------------------------


def finished_task(state: str, finished_ago: timedelta, message_id: str) -> int:
    dispatch.submit_task("client.reply", None, message_id, "data")
    task = Task.objects.get(message_id=message_id)
    Task.objects.filter(pk=task.pk).update(state=state, result="r", finished_at=timezone.now() - finished_ago)
    return task.pk


def test_purge_deletes_finished_tasks_older_than_the_duration_and_keeps_the_rest():
    old = [
        finished_task(Task.State.DONE, timedelta(days=8), "old-done"),
        finished_task(Task.State.FAILED, timedelta(days=9), "old-failed"),
        finished_task(Task.State.CANCELLED, timedelta(days=30), "old-cancelled"),
    ]
    recent = finished_task(Task.State.DONE, timedelta(days=6), "recent-done")
    dispatch.submit_task("client.reply", None, "queued", "never finished")
    unfinished = Task.objects.get(message_id="queued").pk
    # Even an absurdly old unfinished task is not the purge's business.
    Task.objects.filter(pk=unfinished).update(created_at=timezone.now() - timedelta(days=365))

    output = run("purge_tasks", "--older-than", "7d")

    assert "3 finished tasks deleted." in output
    assert not Task.objects.filter(pk__in=old).exists()
    assert set(Task.objects.values_list("pk", flat=True)) == {recent, unfinished}


def test_purge_also_removes_connections_and_processes_closed_before_the_cutoff():
    long_gone = new_process()
    worker = dispatch.register_worker(long_gone, "worker.gone", 1).connection_id
    dispatch.stop_process(long_gone)
    a_month_ago = timezone.now() - timedelta(days=30)
    BrokerProcess.objects.filter(pk=long_gone).update(stopped_at=a_month_ago)
    Connection.objects.filter(pk=worker).update(disconnected_at=a_month_ago)
    running = new_process()
    live_worker = dispatch.register_worker(running, "worker.live", 1).connection_id

    run("purge_tasks", "--older-than", "2w")

    assert not BrokerProcess.objects.filter(pk=long_gone).exists()
    assert not Connection.objects.filter(pk=worker).exists()
    assert Connection.objects.filter(pk=live_worker).exists()


def test_purge_dry_run_counts_and_deletes_nothing():
    finished_task(Task.State.DONE, timedelta(hours=13), "older")
    finished_task(Task.State.DONE, timedelta(hours=11), "newer")

    output = run("purge_tasks", "--older-than", "12h", "--dry-run")

    assert "1 finished task would be deleted (dry run)." in output
    assert Task.objects.count() == 2


@pytest.mark.parametrize("duration", ["7", "seven days", "7x", "1.5h", "-1d", "1M", ""])
def test_purge_refuses_a_duration_it_cannot_read(duration):
    finished_task(Task.State.DONE, timedelta(days=30), "old")

    with pytest.raises(CommandError, match="is not a duration"):
        run("purge_tasks", f"--older-than={duration}")

    assert Task.objects.count() == 1


def test_purge_refuses_a_duration_reaching_back_before_the_calendar():
    with pytest.raises(CommandError, match="before the year 1"):
        run("purge_tasks", "--older-than", "999999w")


def test_purge_requires_older_than():
    with pytest.raises(CommandError, match="--older-than"):
        run("purge_tasks")


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("0s", timedelta()),
    ],
)
def test_durations_are_a_whole_number_and_a_unit(text, expected):
    assert parse_duration(text) == expected
