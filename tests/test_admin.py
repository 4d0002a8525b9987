"""The broker's admin: tasks to filter, search, requeue and cancel; workers, clients and processes to look at.

Pages are fetched as a logged-in superuser through Django's test client. The
actions are also followed onto the wire: a real in-process client or worker
(``WebsocketCommunicator`` on the ASGI application) receives what the
operator's action sent it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from broker import dispatch
from broker.models import BrokerProcess, Connection, Task
from turtlemq_site.asgi import application

TIMEOUT = 10.0

TASKS = "/admin/broker/task/"
WORKERS = "/admin/broker/workerconnection/"
CLIENTS = "/admin/broker/clientconnection/"
PROCESSES = "/admin/broker/brokerprocess/"


# --- data made the way the broker makes it ------------------------------------------------


def new_process() -> int:
    process_id, _ = dispatch.register_process(f"host-{uuid.uuid4().hex[:8]}", 4242)
    return process_id


def submit(message_id: str, data: str = "data", client_id: str | None = None, reply: str = "client.reply") -> int:
    dispatch.submit_task(reply, client_id, message_id, data)
    return Task.objects.filter(message_id=message_id).latest("pk").pk


def task_in_state(state: str, message_id: str) -> int:
    pk = submit(message_id)
    if state != Task.State.QUEUED:
        Task.objects.filter(pk=pk).update(state=state, result="r", finished_at=timezone.now())
    return pk


def listed(response: Any) -> list[int]:
    """The primary keys on a changelist page."""
    return sorted(obj.pk for obj in response.context["cl"].result_list)


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def run_action(client: Client, action: str, task_ids: list[int]) -> Any:
    return client.post(TASKS, {"action": action, "_selected_action": task_ids}, follow=True)


# --- tasks: pages --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_index_lists_tasks_workers_clients_and_broker_processes(admin_client):
    page = admin_client.get("/admin/").content.decode()
    for entry in ("Tasks", "Workers", "Clients", "Broker processes"):
        assert f">{entry}<" in page


@pytest.mark.django_db
def test_task_list_shows_id_message_client_state_worker_attempts_and_times(admin_client):
    process = new_process()
    worker = dispatch.register_worker(process, "worker.one", 1).connection_id
    pk = submit("order-17", client_id="shop")

    response = admin_client.get(TASKS)

    assert response.status_code == 200
    page = response.content.decode()
    for header in ("taskId", "Message id", "Client id", "State", "Worker", "Attempts", "Failures", "Created at"):
        assert header in page
    assert listed(response) == [pk]
    assert "order-17" in page and "shop" in page
    assert f"{WORKERS}{worker}/change/" in page  # the task's worker, linked


@pytest.mark.django_db
def test_task_list_filters_by_state(admin_client):
    queued = task_in_state(Task.State.QUEUED, "q")
    failed = [task_in_state(Task.State.FAILED, "f1"), task_in_state(Task.State.FAILED, "f2")]
    task_in_state(Task.State.DONE, "d")

    assert listed(admin_client.get(TASKS, {"state__exact": "failed"})) == sorted(failed)
    assert listed(admin_client.get(TASKS, {"state__exact": "queued"})) == [queued]
    assert listed(admin_client.get(TASKS, {"state__exact": "cancelled"})) == []


@pytest.mark.django_db
def test_task_search_finds_an_exact_message_id_or_client_id(admin_client):
    wanted = submit("invoice-2024-001", client_id="billing")
    submit("invoice-2024-0011")
    submit("other", client_id="shop")

    assert listed(admin_client.get(TASKS, {"q": "invoice-2024-001"})) == [wanted]
    assert listed(admin_client.get(TASKS, {"q": "billing"})) == [wanted]
    assert listed(admin_client.get(TASKS, {"q": "invoice"})) == []


@pytest.mark.django_db
def test_task_search_with_a_number_finds_the_task_with_that_id(admin_client):
    first = submit("a")
    second = submit(str(first))  # a messageId that looks like the first taskId

    assert listed(admin_client.get(TASKS, {"q": str(second)})) == [second]
    assert listed(admin_client.get(TASKS, {"q": str(first)})) == sorted([first, second])
    assert listed(admin_client.get(TASKS, {"q": "9" * 30})) == []  # beyond any id, and no error


@pytest.mark.django_db
def test_a_task_page_shows_everything_and_is_view_only(admin_client):
    pk = submit("m1", data="the payload")

    response = admin_client.get(f"{TASKS}{pk}/change/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "View task" in page and "the payload" in page and "m1" in page
    assert 'name="_save"' not in page
    refused = admin_client.post(f"{TASKS}{pk}/change/", {"state": "done", "data": "changed"})
    assert refused.status_code == 403
    task = Task.objects.get(pk=pk)
    assert (task.state, task.data) == (Task.State.QUEUED, "the payload")


@pytest.mark.django_db
def test_tasks_cannot_be_added_or_deleted_by_hand(admin_client):
    pk = submit("m1")

    assert admin_client.get(f"{TASKS}add/").status_code == 403
    assert admin_client.post(f"{TASKS}{pk}/delete/", {"post": "yes"}).status_code == 403
    assert run_action(admin_client, "delete_selected", [pk]).status_code == 200
    assert Task.objects.filter(pk=pk).exists()


# --- tasks: actions ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_requeue_puts_failed_and_cancelled_tasks_back_and_says_how_many(admin_client):
    failed = task_in_state(Task.State.FAILED, "f")
    cancelled = task_in_state(Task.State.CANCELLED, "c")
    Task.objects.filter(pk=failed).update(failures=3, last_error="boom")

    response = run_action(admin_client, "requeue", [failed, cancelled])

    assert messages_of(response) == ["2 tasks went back to the queue."]
    for pk in (failed, cancelled):
        task = Task.objects.get(pk=pk)
        assert (task.state, task.failures, task.result, task.finished_at) == (Task.State.QUEUED, 0, None, None)


@pytest.mark.django_db
def test_requeue_leaves_done_and_queued_tasks_as_they_are_and_says_so(admin_client):
    failed = task_in_state(Task.State.FAILED, "f")
    done = task_in_state(Task.State.DONE, "d")
    queued = task_in_state(Task.State.QUEUED, "q")

    response = run_action(admin_client, "requeue", [failed, done, queued])

    assert messages_of(response) == [
        "1 task went back to the queue. 2 selected tasks were left as they were: "
        "only assigned, failed and cancelled tasks can be requeued."
    ]
    assert Task.objects.get(pk=done).state == Task.State.DONE
    assert Task.objects.get(pk=done).result == "r"


@pytest.mark.django_db
def test_requeue_takes_an_assigned_task_from_a_stuck_worker_and_gives_it_to_an_idle_one(admin_client):
    process = new_process()
    stuck = dispatch.register_worker(process, "worker.stuck", 1).connection_id
    pk = submit("m")
    idle = dispatch.register_worker(process, "worker.idle", 1).connection_id

    response = run_action(admin_client, "requeue", [pk])

    assert messages_of(response) == ["1 task went back to the queue."]
    task = Task.objects.get(pk=pk)
    assert (task.state, task.worker_id, task.attempts) == (Task.State.ASSIGNED, idle, 2)
    assert Connection.objects.get(pk=stuck).in_flight == 0


@pytest.mark.django_db
def test_cancel_ends_queued_and_assigned_tasks_only(admin_client):
    worker = dispatch.register_worker(new_process(), "worker.one", 1).connection_id
    assigned = submit("a")
    queued = submit("q")
    done = task_in_state(Task.State.DONE, "d")

    response = run_action(admin_client, "cancel", [assigned, queued, done])

    assert messages_of(response) == [
        "2 tasks were cancelled. 1 selected task was left as it was: only queued and assigned tasks can be cancelled."
    ]
    assert Task.objects.get(pk=assigned).state == Task.State.CANCELLED
    assert Task.objects.get(pk=queued).state == Task.State.CANCELLED
    assert Task.objects.get(pk=done).state == Task.State.DONE
    assert Connection.objects.get(pk=worker).in_flight == 0


@pytest.mark.django_db
def test_an_operator_who_may_only_view_tasks_cannot_requeue_or_cancel(client):
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client.force_login(viewer)
    failed = task_in_state(Task.State.FAILED, "f")
    queued = task_in_state(Task.State.QUEUED, "q")

    page = client.get(TASKS)
    assert page.status_code == 200 and listed(page) == sorted([failed, queued])
    assert 'value="requeue"' not in page.content.decode()
    run_action(client, "requeue", [failed])
    run_action(client, "cancel", [queued])

    assert Task.objects.get(pk=failed).state == Task.State.FAILED
    assert Task.objects.get(pk=queued).state == Task.State.QUEUED


# --- actions, followed onto the wire --------------------------------------------------------------


async def connect(register: dict[str, Any]) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, "/")
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    await communicator.send_json_to(register)
    assert await communicator.receive_json_from(timeout=TIMEOUT) == register
    return communicator


async def wait_for(condition: Callable[[], Any], what: str) -> Any:
    """Poll the database until ``condition()`` returns something truthy; return it."""
    check = database_sync_to_async(condition)
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not (value := await check()):
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not happen within {TIMEOUT} s"
        await asyncio.sleep(0.02)
    return value


@sync_to_async
def operator_runs(action: str, task_ids: list[int]) -> list[str]:
    """A superuser picks ``action`` for ``task_ids`` on the task list; returns the messages shown."""
    admin = User.objects.create_superuser(f"admin-{uuid.uuid4().hex[:8]}", "admin@example.com", "pw")
    client = Client()
    client.force_login(admin)
    response = run_action(client, action, task_ids)
    assert response.status_code == 200
    return messages_of(response)


@pytest.mark.django_db(transaction=True)
async def test_a_client_receives_task_failed_when_the_operator_cancels_its_task():
    client = await connect({"type": "REGISTER_CLIENT", "data": ""})
    await client.send_json_to({"type": "REQUEST_TASK", "messageId": "m1", "data": "never done"})
    pk = await wait_for(lambda: Task.objects.filter(message_id="m1").values_list("pk", flat=True).first(), "submit")

    assert await operator_runs("cancel", [pk]) == ["1 task was cancelled."]

    assert await client.receive_json_from(timeout=TIMEOUT) == {
        "type": "TASK_FAILED",
        "messageId": "m1",
        "data": "cancelled by an operator",
    }
    assert await database_sync_to_async(lambda: Task.objects.get(pk=pk).state)() == Task.State.CANCELLED
    await client.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_worker_receives_a_failed_task_again_when_the_operator_requeues_it():
    worker = await connect({"type": "REGISTER_WORKER", "data": ""})
    client = await connect({"type": "REGISTER_CLIENT", "data": ""})
    await client.send_json_to({"type": "REQUEST_TASK", "messageId": "m1", "data": "flaky", "maxAttempts": 1})
    task = await worker.receive_json_from(timeout=TIMEOUT)
    await worker.send_json_to({"type": "FAIL_TASK", "taskId": task["taskId"], "data": "disk full"})
    assert await client.receive_json_from(timeout=TIMEOUT) == {
        "type": "TASK_FAILED",
        "messageId": "m1",
        "data": "disk full",
    }

    assert await operator_runs("requeue", [int(task["taskId"])]) == ["1 task went back to the queue."]

    assert await worker.receive_json_from(timeout=TIMEOUT) == {
        "type": "REQUEST_TASK",
        "taskId": task["taskId"],
        "data": "flaky",
    }
    await worker.send_json_to({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "done at last"})
    assert await client.receive_json_from(timeout=TIMEOUT) == {
        "type": "RESPONSE_TASK",
        "messageId": "m1",
        "data": "done at last",
    }
    await client.disconnect()
    await worker.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_cancelling_the_task_a_worker_holds_frees_it_for_the_next_queued_task():
    worker = await connect({"type": "REGISTER_WORKER", "data": ""})
    client = await connect({"type": "REGISTER_CLIENT", "data": ""})
    await client.send_json_to({"type": "REQUEST_TASK", "messageId": "stuck", "data": "hangs"})
    stuck = await worker.receive_json_from(timeout=TIMEOUT)
    await client.send_json_to({"type": "REQUEST_TASK", "messageId": "next", "data": "waits"})
    await wait_for(lambda: Task.objects.queued().filter(message_id="next").exists(), "the second task queued")

    assert await operator_runs("cancel", [int(stuck["taskId"])]) == ["1 task was cancelled."]

    assert await client.receive_json_from(timeout=TIMEOUT) == {
        "type": "TASK_FAILED",
        "messageId": "stuck",
        "data": "cancelled by an operator",
    }
    following = await worker.receive_json_from(timeout=TIMEOUT)
    assert (following["type"], following["data"]) == ("REQUEST_TASK", "waits")
    # The worker's late answer to the cancelled task changes nothing.
    await worker.send_json_to({"type": "RESPONSE_TASK", "taskId": stuck["taskId"], "data": "too late"})
    error = await worker.receive_json_from(timeout=TIMEOUT)
    assert (error["type"], error["code"]) == ("ERROR", "UNKNOWN_TASK")
    await client.disconnect()
    await worker.disconnect()


# --- workers, clients, processes ---------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("page", [WORKERS, CLIENTS, PROCESSES])
def test_workers_clients_and_processes_can_be_viewed_but_not_added_changed_or_deleted(admin_client, page):
    process = new_process()
    worker = dispatch.register_worker(process, "worker.one", 1).connection_id
    client = dispatch.register_client(process, "client.one", "shop").connection_id
    pk = {WORKERS: worker, CLIENTS: client, PROCESSES: process}[page]

    assert admin_client.get(page).status_code == 200
    view = admin_client.get(f"{page}{pk}/change/")
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    assert admin_client.get(f"{page}add/").status_code == 403
    assert admin_client.post(f"{page}{pk}/change/", {"concurrency": 5, "hostname": "x"}).status_code == 403
    assert admin_client.post(f"{page}{pk}/delete/", {"post": "yes"}).status_code == 403
    assert Connection.objects.filter(pk__in=[worker, client]).count() == 2
    assert Connection.objects.get(pk=worker).concurrency == 1
    assert BrokerProcess.objects.get(pk=process).hostname.startswith("host-")


@pytest.mark.django_db
def test_worker_list_shows_only_workers_with_their_state_and_load(admin_client):
    process = new_process()
    idle = dispatch.register_worker(process, "worker.idle", 1).connection_id
    busy = dispatch.register_worker(process, "worker.busy", 2).connection_id
    Connection.objects.filter(pk=busy).update(ready_at=timezone.now() - timedelta(hours=1))
    submit("m")  # goes to the longest-idle worker: busy
    gone = dispatch.register_worker(process, "worker.gone", 1).connection_id
    dispatch.release_connection(gone)
    dispatch.register_client(process, "client.one", "shop")

    response = admin_client.get(WORKERS)

    assert listed(response) == sorted([idle, busy, gone])
    rows = {row.pk: row for row in response.context["cl"].result_list}
    model_admin = response.context["cl"].model_admin
    assert [model_admin.status(rows[pk]) for pk in (idle, busy, gone)] == ["idle", "busy", "disconnected"]
    page = response.content.decode()
    assert f"worker__id__exact={busy}" in page  # its held task, one click away
    assert listed(admin_client.get(WORKERS, {"live": "yes"})) == sorted([idle, busy])
    assert listed(admin_client.get(WORKERS, {"live": "no"})) == [gone]


@pytest.mark.django_db
def test_a_worker_page_lists_the_tasks_it_holds(admin_client):
    worker = dispatch.register_worker(new_process(), "worker.one", 2).connection_id
    held = [submit("first", data="alpha"), submit("second", data="beta")]
    done = submit("third")  # queued: the worker is full
    Task.objects.filter(pk=done).update(state=Task.State.DONE, worker_id=worker)

    page = admin_client.get(f"{WORKERS}{worker}/change/").content.decode()

    assert "Held tasks" in page
    for pk in held:
        assert f"{TASKS}{pk}/change/" in page
    assert f"{TASKS}{done}/change/" not in page


@pytest.mark.django_db
def test_client_list_shows_only_clients_with_their_id_and_tasks_in_flight(admin_client):
    process = new_process()
    shop = dispatch.register_client(process, "client.shop", "shop").connection_id
    anonymous = dispatch.register_client(process, "client.anon", None).connection_id
    dispatch.register_worker(process, "worker.one", 1)
    submit("a", client_id="shop", reply="client.shop")  # assigned
    submit("b", client_id="shop", reply="client.shop")  # queued
    finished = submit("c", client_id="shop", reply="client.shop")
    Task.objects.filter(pk=finished).update(state=Task.State.DONE)

    response = admin_client.get(CLIENTS)

    assert listed(response) == sorted([shop, anonymous])
    rows = {row.pk: row for row in response.context["cl"].result_list}
    assert rows[shop].unfinished_tasks == 2
    assert rows[anonymous].unfinished_tasks == 0
    assert "reply_channel=client.shop" in response.content.decode()
    assert listed(admin_client.get(CLIENTS, {"q": "shop"})) == [shop]


@pytest.mark.django_db
def test_broker_process_list_shows_heartbeat_whether_it_runs_and_its_connections(admin_client):
    running = new_process()
    dispatch.register_worker(running, "worker.one", 1)
    dispatch.register_client(running, "client.one", None)
    stopped = new_process()
    dispatch.stop_process(stopped)

    response = admin_client.get(PROCESSES)

    rows = {row.pk: row for row in response.context["cl"].result_list}
    assert (rows[running].live_worker_count, rows[running].live_client_count) == (1, 1)
    assert rows[stopped].stopped_at is not None
    assert "Heartbeat at" in response.content.decode()
    assert listed(admin_client.get(PROCESSES, {"running": "yes"})) == [running]
    assert listed(admin_client.get(PROCESSES, {"running": "no"})) == [stopped]


@pytest.mark.django_db
def test_the_admin_stylesheets_are_served_by_the_broker_itself(admin_client):
    response = admin_client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert b"".join(response.streaming_content if response.streaming else [response.content]).strip()
