"""End-to-end reliability (issue 5): leases, poison tasks, half-open peers, paused and stopped broker processes.

Real daphne processes and real sockets, as in ``test_tasks_e2e``. Processes
are frozen with SIGSTOP to play a peer or a broker that vanished without
closing anything, and stopped with SIGTERM to play a deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import re
import signal
import socket
import time
import urllib.parse
import urllib.request

import pytest

from .peers import EchoWorker, Peer, wait_until
from .servers import BrokerServer, Stack, embedded_stack
from .worker_process import WorkerProcess

pytestmark = pytest.mark.e2e

GOING_AWAY = 1001
SERVICE_RESTART = 1012


def results_by_message_id(frames: list[dict]) -> dict[str, str]:
    assert len({frame["messageId"] for frame in frames}) == len(frames), f"a result arrived twice: {frames}"
    return {frame["messageId"]: frame["data"] for frame in frames}


async def no_work_left(peer: Peer) -> None:
    """STATUS comes next (so nothing else was on its way) and shows no task queued or running."""
    status = await peer.status()
    assert (status["queuedTasks"], status["runningTasks"]) == (0, 0), status


# --- leases ------------------------------------------------------------------------------------


async def test_a_late_result_after_the_lease_expired_is_refused_and_the_client_gets_one_result(stack: Stack) -> None:
    slow = await Peer.connect(stack.worker_url)
    await slow.register_worker()
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    await client.send({"type": "REQUEST_TASK", "messageId": "m1", "data": "job", "timeout": 2})
    held = await slow.expect("REQUEST_TASK")
    prompt = await EchoWorker.start(stack.worker_url)

    # The slow worker holds the task past its lease: the task goes to the other worker.
    assert await client.recv(timeout=20) == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "JOB"}
    assert prompt.got == [(held["taskId"], "job")]
    await slow.send({"type": "RESPONSE_TASK", "taskId": held["taskId"], "data": "late"})

    error = await slow.expect("ERROR")
    assert (error["code"], error["ref"]) == ("UNKNOWN_TASK", {"type": "RESPONSE_TASK", "taskId": held["taskId"]})
    await no_work_left(slow)  # no task re-sent to it: it holds none
    await no_work_left(client)  # and the late result did not reach the client


class AdminSession:
    """A logged-in operator using the admin over HTTP, as a browser would."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def _csrf(self, path: str) -> str:
        with self.opener.open(self.base_url + path, timeout=10) as response:
            page = response.read().decode()
        return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)

    def _post(self, path: str, fields: dict[str, str]) -> str:
        fields = {"csrfmiddlewaretoken": self._csrf(path), **fields}
        request = urllib.request.Request(self.base_url + path, data=urllib.parse.urlencode(fields).encode())
        with self.opener.open(request, timeout=10) as response:
            return response.read().decode()

    def log_in(self, username: str, password: str) -> None:
        page = self._post("/admin/login/?next=/admin/", {"username": username, "password": password, "next": "/admin/"})
        assert "Log out" in page or "logout" in page, "the operator could not log in"

    def run_task_action(self, action: str, task_id: str) -> str:
        return self._post("/admin/broker/task/", {"action": action, "_selected_action": task_id, "index": "0"})


async def test_a_poison_task_fails_after_its_attempts_and_an_operator_requeues_it_from_the_admin(stack: Stack) -> None:
    failing = await Peer.connect(stack.worker_url)
    await failing.register_worker()
    client = await Peer.connect(stack.client_url)
    await client.register_client("poisoned")
    await client.send({"type": "REQUEST_TASK", "messageId": "m1", "data": "poison", "maxAttempts": 2})
    for attempt in (1, 2):
        task = await failing.expect("REQUEST_TASK", timeout=15)
        await failing.send({"type": "FAIL_TASK", "taskId": task["taskId"], "data": f"crash {attempt}"})

    assert await client.recv(timeout=15) == {"type": "TASK_FAILED", "messageId": "m1", "data": "crash 2"}
    await failing.close()
    await no_work_left(client)

    await asyncio.to_thread(
        stack.manage,
        *("createsuperuser", "--noinput", "--username", "operator", "--email", "operator@example.com"),
        extra_env={"DJANGO_SUPERUSER_PASSWORD": "a long operator password"},
    )
    operator = AdminSession(f"http://127.0.0.1:{stack.servers[0].port}")
    await asyncio.to_thread(operator.log_in, "operator", "a long operator password")
    page = await asyncio.to_thread(operator.run_task_action, "requeue", task["taskId"])
    assert "1 task went back to the queue." in page

    healthy = await EchoWorker.start(stack.worker_url)
    assert await client.recv(timeout=15) == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "POISON"}
    assert healthy.data == ["poison"]
    await no_work_left(client)


# --- half-open connections -------------------------------------------------------------------------


@pytest.mark.stack_env(TURTLEMQ_PING_INTERVAL=1, TURTLEMQ_PING_TIMEOUT=1)
async def test_task_of_a_frozen_worker_migrates_once_it_stops_answering_pings(stack: Stack) -> None:
    frozen = await WorkerProcess.start(stack.worker_url, hold_prefix="job")
    try:
        client = await Peer.connect(stack.client_url)
        await client.register_client()
        await client.request_task("m1", "job one")
        [(task_id, _)] = await frozen.wait_for_tasks(1)
        survivor = await EchoWorker.start(stack.worker_url)

        # Its socket stays open but nobody answers: no close, no FIN, only missing pongs.
        frozen.send_signal(signal.SIGSTOP)

        assert await client.recv(timeout=30) == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "JOB ONE"}
        assert survivor.got == [(task_id, "job one")]
        status = await client.status()
        assert (status["idleWorkers"], status["busyWorkers"], status["runningTasks"]) == (1, 0, 0)
    finally:
        await frozen.kill()  # SIGKILL ends a stopped process too


# --- broker processes: paused past the dead-process timeout, stopped with SIGTERM ---------------------------


@contextlib.contextmanager
def frozen(server: BrokerServer) -> None:
    server.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.send_signal(signal.SIGCONT)


async def test_a_broker_process_paused_past_the_timeout_closes_its_stale_connections_and_serves_again(
    two_process_stack: Stack,
) -> None:
    stack = two_process_stack
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    holder = await EchoWorker.start(stack.worker_url, concurrency=2, hold_prefix="")
    for n in range(2):
        await client.request_task(f"m{n}", f"task {n}")
    await holder.wait_for_tasks(2)
    rescuer = await EchoWorker.start(stack.client_url, concurrency=2)

    with frozen(stack.servers[-1]):
        # The other process declares it dead (3 s) and hands its tasks to the rescuer.
        results = results_by_message_id(await client.collect("RESPONSE_TASK", 2, timeout=30))
        assert results == {"m0": "TASK 0", "m1": "TASK 1"}
    # Thawed, it learns it was declared dead: its old connection is closed so the peer reconnects.
    await holder.wait_disconnected(timeout=15)
    assert holder.peer.connection.close_code == GOING_AWAY

    newcomer = await EchoWorker.start(stack.worker_url)
    expected = {"idleWorkers": 2, "busyWorkers": 0, "clients": 1, "queuedTasks": 0, "runningTasks": 0}
    assert await client.status() == expected  # the rescuer and the newcomer; the old holder is gone
    await rescuer.close()
    await client.request_task("after", "after the pause")
    assert await client.recv(timeout=15) == {"type": "RESPONSE_TASK", "messageId": "after", "data": "AFTER THE PAUSE"}
    assert newcomer.data == ["after the pause"]


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.stack_env(TURTLEMQ_PROCESS_DEAD_AFTER=120)
async def test_sigterm_hands_the_tasks_of_its_workers_to_the_other_process_at_once(two_process_stack: Stack) -> None:
    stack = two_process_stack
    leaving = stack.servers[-1]
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    holders = [await EchoWorker.start(stack.worker_url, concurrency=2, hold_prefix="") for _ in range(2)]
    for n in range(4):
        await client.request_task(f"m{n}", f"task {n}")
    await wait_until(lambda: sum(len(h.got) for h in holders) == 4, what="the holders to hold every task")
    rescuer = await EchoWorker.start(stack.client_url, concurrency=4)
    # A frozen peer never finishes the closing handshake, which keeps the shutdown going for a moment.
    frozen_peer = await WorkerProcess.start(stack.worker_url)
    frozen_peer.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        leaving.send_signal(signal.SIGTERM)

        # It stops accepting connections while it is still handing back its work.
        await wait_until(lambda: refuses_connections(leaving.port), timeout=10, what="the port to refuse connections")
        assert leaving.process.poll() is None, "the process exited before it was seen refusing connections"
        # Its workers' tasks reach the other process's worker long before anybody would declare it dead.
        results = results_by_message_id(await client.collect("RESPONSE_TASK", 4, timeout=20))
        assert results == {f"m{n}": f"TASK {n}" for n in range(4)}
        assert sorted(rescuer.data) == [f"task {n}" for n in range(4)]
        assert time.monotonic() - started < 20
        for holder in holders:
            await holder.wait_disconnected()
            assert holder.peer.connection.close_code == GOING_AWAY
        assert await asyncio.to_thread(leaving.process.wait, 15) == 0
    finally:
        await frozen_peer.kill()
    await no_work_left(client)
    status = await client.status()
    assert (status["idleWorkers"], status["busyWorkers"]) == (1, 0)


def database_counts(stack: Stack) -> dict:
    """Tasks by state, live connections and running processes, as the database says."""
    code = (
        "import json; from django.db.models import Count; from broker.models import *; "
        "print(json.dumps({'tasks': dict(Task.objects.values_list('state').annotate(n=Count('pk'))), "
        "'live': Connection.objects.live().count(), "
        "'running': BrokerProcess.objects.running().count()}))"
    )
    return json.loads(stack.manage("shell", "-c", code).stdout.splitlines()[-1])


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
async def test_sigterm_of_the_only_broker_process_puts_held_tasks_back_in_the_queue(tmp_path, server: str) -> None:
    # Daphne through its shutdown trigger, uvicorn through the ASGI lifespan.
    with embedded_stack(tmp_path, server=server) as stack:
        client = await Peer.connect(stack.client_url)
        await client.register_client("patient")
        holder = await EchoWorker.start(stack.worker_url, concurrency=2, hold_prefix="")
        for n in range(3):
            await client.request_task(f"m{n}", f"task {n}")
        await holder.wait_for_tasks(2)

        await asyncio.to_thread(stack.servers[0].stop, signal.SIGTERM)

        # Uvicorn re-raises the signal once it has shut down cleanly.
        assert stack.servers[0].process.returncode in (0, -signal.SIGTERM if server == "uvicorn" else 0)
        assert await client.expect_closed() in (GOING_AWAY, SERVICE_RESTART)  # uvicorn says 1012
        assert await asyncio.to_thread(database_counts, stack) == {"tasks": {"queued": 3}, "live": 0, "running": 0}
        await asyncio.to_thread(stack.servers[0].start)
        worker = await EchoWorker.start(stack.worker_url, concurrency=3)
        resumed = await Peer.connect(stack.client_url)
        await resumed.register_client("patient")
        results = results_by_message_id(await resumed.collect("RESPONSE_TASK", 3, timeout=15))
        assert results == {f"m{n}": f"TASK {n}" for n in range(3)}
        assert sorted(worker.data) == [f"task {n}" for n in range(3)]
