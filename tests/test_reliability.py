"""Leases, dead and revived broker processes, orphans and shutdown, in-process (issue 5).

Domain tests call ``broker.dispatch`` against the database; node tests run the
consumer through ``WebsocketCommunicator`` with this test's event loop as the
broker process, and play "another process" by calling the domain directly.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.db import transaction
from django.utils import timezone

from broker import dispatch
from broker.dispatch import Outcome, ProcessStopped
from broker.models import BrokerProcess, Connection, Task
from broker.node import node
from tests.communicators import wait_until
from turtlemq_site.asgi import application

GOING_AWAY = 1001


def new_process() -> int:
    """A broker process row on a host of its own, so that nothing reaps it by pid."""
    process_id, _ = dispatch.register_process(f"host-{uuid.uuid4().hex[:8]}", 4242)
    return process_id


def add_worker(process_id: int, name: str, concurrency: int = 1) -> int:
    return dispatch.register_worker(process_id, f"worker.{name}", concurrency).connection_id


def submit(message_id: str, **options) -> dispatch.Effects:
    return dispatch.submit_task("client.app", "app", message_id, f"data of {message_id}", **options)


def task(message_id: str) -> Task:
    return Task.objects.get(message_id=message_id)


def reap(process_id: int, by: int) -> dispatch.Effects:
    """Process ``by`` finds ``process_id`` silent for too long and reaps it, as its housekeeping would."""
    with transaction.atomic():
        BrokerProcess.objects.filter(pk=process_id).update(heartbeat_at=timezone.now() - timedelta(days=1))
        return dispatch.housekeep(by)


# --- leases -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_task_without_a_timeout_gets_the_default_lease(settings):
    settings.TURTLEMQ_DEFAULT_LEASE = 600
    add_worker(new_process(), "w")
    submit("m1")
    row = task("m1")
    assert row.timeout is None
    assert row.lease_expires_at == row.assigned_at + timedelta(seconds=600)


@pytest.mark.django_db
def test_touch_task_renews_the_default_lease(settings):
    settings.TURTLEMQ_DEFAULT_LEASE = 600
    worker = add_worker(new_process(), "w")
    (assignment,) = submit("m1").assignments
    Task.objects.filter(pk=int(assignment.task_id)).update(lease_expires_at=timezone.now())
    before = timezone.now()
    dispatch.touch_task(worker, assignment.task_id)
    assert task("m1").lease_expires_at >= before + timedelta(seconds=600)


@pytest.mark.django_db
def test_tasks_handed_out_together_keep_their_own_leases(settings):
    settings.TURTLEMQ_DEFAULT_LEASE = 600
    submit("own", timeout=5)
    submit("default")
    add_worker(new_process(), "w", concurrency=2)
    own, default = task("own"), task("default")
    assert own.assigned_at == default.assigned_at
    assert own.lease_expires_at == own.assigned_at + timedelta(seconds=5)
    assert default.lease_expires_at == default.assigned_at + timedelta(seconds=600)


@pytest.mark.django_db
def test_the_default_lease_takes_back_a_task_of_a_hung_worker(settings):
    settings.TURTLEMQ_DEFAULT_LEASE = 30
    settings.TURTLEMQ_RETRY_BACKOFF = 0
    process = new_process()
    hung = add_worker(process, "hung")
    (assignment,) = submit("m1").assignments
    add_worker(process, "other")

    assert not dispatch.expire_leases(timezone.now() + timedelta(seconds=29))
    effects = dispatch.expire_leases(timezone.now() + timedelta(seconds=31))

    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.other", assignment.task_id)]
    with pytest.raises(dispatch.UnknownTask):
        dispatch.complete_task(hung, assignment.task_id, "late")


@pytest.mark.django_db
def test_a_poison_task_ends_failed_after_its_attempts_and_an_operator_can_requeue_it(settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 0
    process = new_process()
    worker = add_worker(process, "w")
    submit("poison", timeout=1, max_attempts=2)
    outcomes = []
    for attempt in (1, 2):
        # Each lease expires; the task goes straight back to the only worker until it runs out of attempts.
        outcomes += dispatch.expire_leases(timezone.now() + timedelta(seconds=10 * attempt)).outcomes
    row = task("poison")
    assert (row.state, row.attempts, row.failures, row.last_error) == ("failed", 2, 2, "lease expired")
    assert outcomes == [Outcome("client.app", row.pk, "poison", False, "lease expired")]

    count, effects = dispatch.requeue_tasks([row.pk])
    assert count == 1
    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.w", str(row.pk))]
    dispatch.complete_task(worker, str(row.pk), "finally")
    assert (task("poison").state, task("poison").result) == ("done", "finally")


# --- broker processes: reaped while alive, orphans, stop -------------------------------------------------


@pytest.mark.django_db
def test_reaping_re_sends_results_a_dead_process_may_not_have_announced_to_connected_clients():
    dead, survivor = new_process(), new_process()
    worker = add_worker(dead, "on-the-dead-process")
    connected = dispatch.register_client(survivor, "client.connected", "connected").connection_id
    gone = dispatch.register_client(survivor, "client.gone", "gone").connection_id
    for client_id, channel in (("connected", "client.connected"), ("gone", "client.gone")):
        for message_id in ("announced", "unannounced"):
            (assignment,) = dispatch.submit_task(channel, client_id, message_id, "x").assignments
            dispatch.complete_task(worker, assignment.task_id, f"{client_id} {message_id}")
    # The dead process committed every result but announced only some before it died.
    dispatch.mark_delivered(list(Task.objects.filter(message_id="announced").values_list("pk", flat=True)))
    dispatch.release_connection(gone)

    effects = reap(dead, by=survivor)

    owed = Task.objects.get(client_id="connected", message_id="unannounced")
    assert effects.outcomes == [Outcome("client.connected", owed.pk, "unannounced", True, "connected unannounced")]
    assert Connection.objects.get(pk=connected).disconnected_at is None


@pytest.mark.django_db
def test_reaping_reminds_workers_elsewhere_of_tasks_handed_out_just_before_the_death(settings):
    settings.TURTLEMQ_TICK = 1
    dead, survivor = new_process(), new_process()
    worker = add_worker(survivor, "elsewhere", concurrency=2)
    submit("long ago")
    submit("just before")
    heartbeat = timezone.now() - timedelta(minutes=1)
    Task.objects.filter(message_id="long ago").update(assigned_at=heartbeat - timedelta(minutes=5))
    Task.objects.filter(message_id="just before").update(assigned_at=heartbeat + timedelta(seconds=0.5))

    with transaction.atomic():
        BrokerProcess.objects.filter(pk=dead).update(heartbeat_at=heartbeat)
        effects = dispatch.housekeep(survivor)

    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [
        ("worker.elsewhere", str(task("just before").pk))
    ]
    assert in_flight_of(worker) == 2  # a reminder changes nothing


def in_flight_of(worker_id: int) -> int:
    return Connection.objects.get(pk=worker_id).in_flight


@pytest.mark.django_db
def test_housekeeping_of_a_process_declared_dead_raises_and_changes_nothing():
    reaped, survivor = new_process(), new_process()
    reap(reaped, by=survivor)
    heartbeat = BrokerProcess.objects.get(pk=reaped).heartbeat_at
    with pytest.raises(ProcessStopped):
        dispatch.housekeep(reaped)
    assert BrokerProcess.objects.get(pk=reaped).heartbeat_at == heartbeat


@pytest.mark.django_db
def test_housekeeping_requeues_a_task_held_by_a_closed_connection():
    process = new_process()
    vanished = add_worker(process, "vanished")
    (assignment,) = submit("m1").assignments
    # A crash half way left the connection closed but its task assigned.
    Connection.objects.filter(pk=vanished).update(disconnected_at=timezone.now())
    add_worker(process, "idle")

    effects = dispatch.housekeep(process)

    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.idle", assignment.task_id)]
    assert Connection.objects.get(pk=vanished).in_flight == 0


@pytest.mark.django_db
def test_housekeeping_closes_a_connection_registered_on_a_process_already_declared_dead():
    reaped, survivor = new_process(), new_process()
    reap(reaped, by=survivor)
    # The revived process registered a worker before its heartbeat told it the news.
    straggler = add_worker(reaped, "straggler")
    submit("m1")
    assert task("m1").worker_id == straggler
    add_worker(survivor, "healthy")

    effects = dispatch.housekeep(survivor)

    assert [a.worker_channel for a in effects.assignments] == ["worker.healthy"]
    assert Connection.objects.get(pk=straggler).disconnected_at is not None


@pytest.mark.django_db
def test_housekeeping_with_nothing_orphaned_changes_nothing():
    process = new_process()
    add_worker(process, "w")
    submit("m1")

    def snapshot() -> tuple[list, list]:
        return list(Task.objects.values()), list(Connection.objects.values("pk", "in_flight", "disconnected_at"))

    before = snapshot()
    assert not dispatch.housekeep(process)
    assert snapshot() == before


@pytest.mark.django_db
def test_channels_to_close_are_those_released_with_the_process_and_those_registered_after():
    reaped, survivor = new_process(), new_process()
    dispatch.register_client(reaped, "client.closed-before", None)
    Connection.objects.filter(channel_name="client.closed-before").update(
        disconnected_at=timezone.now() - timedelta(hours=1)
    )
    add_worker(reaped, "released")
    reap(reaped, by=survivor)
    add_worker(reaped, "straggler")
    add_worker(survivor, "elsewhere")
    assert sorted(dispatch.channels_to_close(reaped)) == ["worker.released", "worker.straggler"]


@pytest.mark.django_db
def test_stop_process_of_a_reaped_process_releases_what_registered_after_the_reaping():
    reaped, survivor = new_process(), new_process()
    reap(reaped, by=survivor)
    stopped_at = BrokerProcess.objects.get(pk=reaped).stopped_at
    straggler = add_worker(reaped, "straggler")
    submit("m1")
    dispatch.stop_process(reaped)
    assert task("m1").state == "queued"
    assert Connection.objects.get(pk=straggler).disconnected_at is not None
    assert BrokerProcess.objects.get(pk=reaped).stopped_at == stopped_at  # the first stop stands


# --- the node: revived after being declared dead, stopped, lifespan ----------------------------------------


@database_sync_to_async
def reap_node_from_another_process() -> None:
    """Another broker process declares this one (the test's node) dead."""
    assert node.process_id is not None
    reap(node.process_id, by=new_process())


@database_sync_to_async
def process_row(process_id: int) -> BrokerProcess:
    return BrokerProcess.objects.get(pk=process_id)


@pytest.mark.django_db(transaction=True)
async def test_a_process_declared_dead_while_alive_closes_its_connections_and_serves_afresh(peers, settings):
    settings.TURTLEMQ_TICK = 0.05
    holder = await peers.worker()
    client = await peers.client("resuming")
    await client.submit("m1", "job")
    handed = await holder.next_task()
    old_id = node.process_id
    await reap_node_from_another_process()

    # Its peers are no longer connections the broker counts: they are told to reconnect.
    assert await holder.expect_close() == GOING_AWAY
    assert await client.expect_close() == GOING_AWAY
    assert node.process_id != old_id
    assert (await process_row(node.process_id)).stopped_at is None

    # Reconnected peers are served by the process under its new identity.
    fresh = await peers.worker()
    again = await fresh.next_task()
    assert again["taskId"] == handed["taskId"]
    resumed = await peers.client("resuming")
    await fresh.respond(again, "done")
    assert await resumed.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "done"}
    status = await resumed.status()
    assert (status["idleWorkers"], status["busyWorkers"], status["clients"]) == (1, 0, 1)


@pytest.mark.django_db(transaction=True)
async def test_stopping_the_node_hands_back_tasks_and_closes_every_registered_connection(peers, settings):
    holder = await peers.worker()
    client = await peers.client("leaving")
    await client.submit("m1", "job")
    await holder.next_task()
    process_id = node.process_id
    newcomer = await peers.connect()

    await node.stop()

    assert await holder.expect_close() == GOING_AWAY
    assert await client.expect_close() == GOING_AWAY
    assert (await process_row(process_id)).stopped_at is not None
    row = await database_sync_to_async(lambda: Task.objects.values("state", "worker_id").get())()
    assert row == {"state": "queued", "worker_id": None}
    # A shutting-down process registers nobody.
    await newcomer.send({"type": "REGISTER_WORKER", "data": ""})
    assert await newcomer.expect_close() == GOING_AWAY
    assert not await database_sync_to_async(Connection.objects.live().exists)()


@pytest.mark.django_db(transaction=True)
async def test_lifespan_shutdown_stops_the_node(peers):
    lifespan = ApplicationCommunicator(application, {"type": "lifespan", "asgi": {"version": "3.0"}})
    await lifespan.send_input({"type": "lifespan.startup"})
    assert await lifespan.receive_output(5) == {"type": "lifespan.startup.complete"}
    worker = await peers.worker()
    process_id = node.process_id

    await lifespan.send_input({"type": "lifespan.shutdown"})

    assert await lifespan.receive_output(5) == {"type": "lifespan.shutdown.complete"}
    assert await worker.expect_close() == GOING_AWAY
    assert (await process_row(process_id)).stopped_at is not None
    await wait_until(lambda: not Connection.objects.live().exists(), what="the worker to be released")
