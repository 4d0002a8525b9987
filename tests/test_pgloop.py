"""Batches written out whole, on the event loop's own PostgreSQL connection (``broker.pgloop``).

PostgreSQL only (the suite's second pass). A written-out batch must do what
``dispatch.Batch`` does with the same operations: the first tests run both on
the same database state and compare errors, effects and every row. The
others cover what only the loop has: its plans, its fallback to the database
thread, and its connection's life.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from channels.layers import get_channel_layer
from django.db import DatabaseError, connection

from broker import commits, dispatch, pgloop
from broker.dispatch import Complete, MarkDelivered, Operation, Submit
from broker.models import BrokerProcess, Connection, Task

from .pgproxy import Cut, CuttingProxy

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the loop's connection is PostgreSQL's"),
    pytest.mark.django_db(transaction=True),
]

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def frozen_time(monkeypatch) -> datetime:
    """Every batch (and every model default) at ``NOW``, so that two runs write the same timestamps."""
    monkeypatch.setattr(dispatch.timezone, "now", lambda: NOW)
    return NOW


async def _run_on_loop(operations: list[Operation]) -> tuple[list[Any], dispatch.Effects]:
    loop_connection = await pgloop.LoopConnection.open()
    try:
        script = dispatch.script_batch(operations)
        assert script is not None, "every operation here can be written out"
        return await loop_connection.run(script, len(operations))
    finally:
        await loop_connection.close()


def run_on_loop(operations: list[Operation]) -> tuple[list[Any], dispatch.Effects]:
    """Run a batch as a broker process's event loop would, on a connection of its own."""
    return asyncio.run(_run_on_loop(operations))


# --- the same batch, two ways -------------------------------------------------------------


def snapshot() -> dict[str, Any]:
    """Every task and connection row, and where the task ids go on."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [Task._meta.db_table])
        (sequence,) = cursor.fetchone()
        cursor.execute(f"SELECT last_value, is_called FROM {sequence}")
        last_value, is_called = cursor.fetchone()
    return {
        "tasks": list(Task.objects.order_by("pk").values()),
        "connections": list(Connection.objects.order_by("pk").values()),
        "sequence": (sequence, last_value, is_called),
    }


def restore(state: dict[str, Any]) -> None:
    Task.objects.all().delete()
    Connection.objects.all().delete()
    Connection.objects.bulk_create(Connection(**row) for row in state["connections"])
    Task.objects.bulk_create(Task(**row) for row in state["tasks"])
    sequence, last_value, is_called = state["sequence"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval(%s, %s, %s)", [sequence, last_value, is_called])


def comparable(errors: list[Any], effects: dispatch.Effects) -> tuple:
    """Errors by kind, message and the tasks they re-send; effects in a fixed order."""
    return (
        [(type(error), str(error), getattr(error, "held", None)) if error else None for error in errors],
        sorted(effects.assignments, key=lambda a: (a.worker_channel, int(a.task_id))),
        effects.outcomes,
    )


def new_process() -> int:
    return BrokerProcess.objects.create(hostname=f"host-{uuid.uuid4().hex[:8]}", pid=os.getpid(), heartbeat_at=NOW).pk


def random_batch(seed: int) -> list[Operation]:
    """A database state and a batch for it: workers of every concurrency and idleness, queued tasks
    (some backing off, some with a timeout of their own), held and finished ones; submissions,
    completions (some of tasks the worker does not hold, repeated, or of no task at all) and delivery marks.
    """
    rnd = random.Random(seed)
    process_id = new_process()
    queued = [
        Task.objects.create(
            message_id=f"queued{n}",
            reply_channel="client.a",
            data=f"queued {n}",
            max_attempts=3,
            timeout=rnd.choice([None, None, 5.0, 0.0]),
            not_before=rnd.choice([None, None, NOW + timedelta(seconds=10), NOW - timedelta(seconds=10)]),
        )
        for n in range(rnd.randint(0, 8))
    ]
    held: list[tuple[Connection, Task]] = []
    for n in range(rnd.randint(1, 4)):
        worker = Connection.objects.create(
            channel_name=f"worker.{n}",
            role=Connection.Role.WORKER,
            process_id=process_id,
            concurrency=rnd.randint(1, 3),
            ready_at=NOW - timedelta(seconds=rnd.randint(1, 50)),
            disconnected_at=NOW if rnd.random() < 0.15 else None,
        )
        for m in range(rnd.randint(0, worker.concurrency)):
            task = Task.objects.create(
                message_id=f"held{n}.{m}",
                reply_channel="client.b",
                data="held",
                max_attempts=3,
                state=Task.State.ASSIGNED,
                worker=worker,
                attempts=1,
            )
            held.append((worker, task))
        worker.in_flight = sum(1 for holder, _ in held if holder == worker)
        worker.save()
    finished = [
        Task.objects.create(
            message_id=f"done{n}", reply_channel="client.a", data="d", result="D", max_attempts=3, state=Task.State.DONE
        ).pk
        for n in range(3)
    ]

    operations: list[Operation] = [
        Submit("client.a", None, f"new{n}", f"new {n}", timeout=rnd.choice([None, 30.0]))
        for n in range(rnd.randint(0, 4))
    ]
    for worker, task in held:
        if rnd.random() < 0.7:
            operations.append(Complete(worker.pk, worker.channel_name, str(task.pk), f"result {task.pk}"))
    if held and rnd.random() < 0.5:
        worker, task = rnd.choice(held)
        operations.append(Complete(worker.pk, worker.channel_name, str(task.pk), "again"))  # a repeat
    if len(held) > 1 and rnd.random() < 0.5:
        (worker, _), (_, other) = rnd.sample(held, 2)
        operations.append(Complete(worker.pk, worker.channel_name, str(other.pk), "not mine"))
    if held and rnd.random() < 0.3:
        worker, _ = rnd.choice(held)
        operations.append(Complete(worker.pk, worker.channel_name, rnd.choice(["424242", "abc", "1" * 30]), "?"))
    if queued and held and rnd.random() < 0.3:
        worker, _ = rnd.choice(held)
        operations.append(Complete(worker.pk, worker.channel_name, str(queued[0].pk), "not handed out"))
    if rnd.random() < 0.5:
        operations.append(MarkDelivered(rnd.sample(finished, 2)))
    rnd.shuffle(operations)
    return operations


@pytest.mark.parametrize("seed", range(30))
def test_a_batch_written_out_whole_does_what_the_same_batch_does_in_the_database_thread(frozen_time, seed):
    operations = random_batch(seed)
    before = snapshot()

    in_thread = comparable(*dispatch.run_batch(operations))
    after_thread = snapshot()
    restore(before)
    on_loop = comparable(*run_on_loop(operations))
    after_loop = snapshot()

    assert on_loop == in_thread
    assert after_loop["tasks"] == after_thread["tasks"]
    assert after_loop["connections"] == after_thread["connections"]


def test_new_tasks_go_to_idle_workers_one_slot_each_at_a_time_longest_idle_first(frozen_time):
    process_id = new_process()
    for name, idle_for, concurrency in (("recent", 1, 2), ("oldest", 30, 2), ("middle", 10, 1)):
        Connection.objects.create(
            channel_name=f"worker.{name}",
            role=Connection.Role.WORKER,
            process_id=process_id,
            concurrency=concurrency,
            ready_at=NOW - timedelta(seconds=idle_for),
        )

    errors, effects = run_on_loop([Submit("client.a", None, f"m{n}", f"task {n}") for n in range(6)])

    assert errors == [None] * 6
    dealt = {a.data: a.worker_channel for a in effects.assignments}
    assert dealt == {
        "task 0": "worker.oldest",
        "task 1": "worker.middle",
        "task 2": "worker.recent",
        "task 3": "worker.oldest",
        "task 4": "worker.recent",
    }
    assert dict(Connection.objects.values_list("channel_name", "in_flight")) == {
        "worker.oldest": 2,
        "worker.middle": 1,
        "worker.recent": 2,
    }
    assert Task.objects.get(message_id="m5").state == Task.State.QUEUED


def test_a_completion_refused_names_the_task_the_worker_holds_and_spoils_nothing_else(frozen_time):
    process_id = new_process()
    worker = Connection.objects.create(
        channel_name="worker.w", role=Connection.Role.WORKER, process_id=process_id, in_flight=1, ready_at=NOW
    )
    held = Task.objects.create(
        message_id="held", reply_channel="client.a", data="mine", max_attempts=3, state="assigned", worker=worker
    )

    errors, effects = run_on_loop(
        [
            Submit("client.a", None, "m1", "one"),
            Complete(worker.pk, worker.channel_name, "424242", "lost"),
            Submit("client.a", None, "m2", "two"),
        ]
    )

    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], dispatch.UnknownTask)
    assert errors[1].held == [(str(held.pk), "mine")]  # rule 4: its real task is sent again
    assert not effects.outcomes and not effects.assignments
    assert dict(Task.objects.values_list("message_id", "state")) == {"held": "assigned", "m1": "queued", "m2": "queued"}


def test_a_batch_written_out_whole_is_one_round_trip_to_the_database(frozen_time, monkeypatch):
    """A lone statement alone, several in one pipeline: either way the answer comes once it is committed."""
    process_id = new_process()
    worker = Connection.objects.create(
        channel_name="worker.w", role=Connection.Role.WORKER, process_id=process_id, in_flight=1, ready_at=NOW
    )
    held = Task.objects.create(
        message_id="held", reply_channel="client.a", data="mine", max_attempts=3, state="assigned", worker=worker
    )
    done = Task.objects.create(message_id="done", reply_channel="client.a", data="d", max_attempts=3, state="done")
    trips: list[str] = []
    wait = psycopg.AsyncConnection.wait

    async def counting_wait(self, gen, *args, **kwargs):
        step = getattr(gen, "__name__", "")
        if step in ("_exit_gen", "_sync_gen") or (step == "_execute_gen" and self._pipeline is None):
            trips.append(step)
        return await wait(self, gen, *args, **kwargs)

    monkeypatch.setattr(pgloop, "SIZE_CHECK_EVERY", {False: 3600.0, True: 3600.0})
    monkeypatch.setattr(psycopg.AsyncConnection, "wait", counting_wait)

    async def scenario() -> list[list[str]]:
        loop_connection = await pgloop.LoopConnection.open()
        loop_connection._size_checked_at = time.monotonic()  # its first look at the table's size is not counted
        try:
            counted = []
            for operations in (
                [Complete(worker.pk, worker.channel_name, str(held.pk), "MINE")],
                [Submit("client.a", None, f"m{n}", "x") for n in range(3)] + [MarkDelivered([done.pk])],
            ):
                trips.clear()
                script = dispatch.script_batch(operations)
                assert script is not None
                errors, _ = await loop_connection.run(script, len(operations))
                assert errors == [None] * len(operations)
                counted.append(list(trips))
            return counted
        finally:
            await loop_connection.close()

    lone, several = asyncio.run(scenario())

    assert lone == ["_execute_gen"]  # the completion and the refill: one statement
    assert several == ["_exit_gen"]  # the new tasks; the assignment round and the delivery mark: one pipeline
    assert Task.objects.get(pk=held.pk).state == Task.State.DONE
    assert Task.objects.get(message_id="m0").worker_id == worker.pk  # the worker, idle since its completion
    assert Task.objects.get(pk=done.pk).delivered_at == NOW


# --- plans ----------------------------------------------------------------------------------


async def _prepared_statements(loop_connection: pgloop.LoopConnection) -> list[str]:
    cursor = await loop_connection._connection.execute("SELECT statement FROM pg_prepared_statements")
    return [statement for (statement,) in await cursor.fetchall()]


def fill_task_table(pages: int, state: str = "done") -> None:
    """Tasks in ``state`` until the task table has at least ``pages`` pages."""
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT pg_relation_size('broker_task') / current_setting('block_size')::int")
            if cursor.fetchone()[0] >= pages:
                return
            cursor.execute(
                "INSERT INTO broker_task (message_id, reply_channel, data, state, attempts, failures, max_attempts,"
                " last_error, created_at) SELECT 'old' || g, 'client.old', repeat('x', 100), %s, 1, 0, 3, '', now()"
                " FROM generate_series(1, 200) AS g",
                [state],
            )


def test_statements_are_prepared_only_while_the_task_table_is_large_enough_for_their_plans(monkeypatch):
    monkeypatch.setattr(pgloop, "SIZE_CHECK_EVERY", {False: 0.0, True: 0.0})  # look at every batch
    monkeypatch.setattr(pgloop, "PREPARED_FROM_PAGES", 8)

    async def batch(loop_connection: pgloop.LoopConnection, n: int) -> list[str]:
        script = dispatch.script_batch([Submit("client.a", None, f"m{n}", "x")])
        assert script is not None
        await loop_connection.run(script, 1)
        return [s for s in await _prepared_statements(loop_connection) if "broker_task" in s]

    async def scenario() -> None:
        loop_connection = await pgloop.LoopConnection.open()
        try:
            assert await batch(loop_connection, 1) == []  # a new, empty table: planned each time
            assert await batch(loop_connection, 2) == []
            await asyncio.to_thread(fill_task_table, 8)
            await batch(loop_connection, 3)  # its size seen
            prepared = await batch(loop_connection, 4)
            assert any(statement.startswith("INSERT INTO broker_task") for statement in prepared), prepared
            assert any(statement.startswith("WITH done AS") for statement in prepared), prepared
            # Nearly everything purged, and the table vacuumed down to nothing: the plans go with it.
            await asyncio.to_thread(Task.objects.all().delete)
            await loop_connection._connection.execute("VACUUM broker_task")
            await batch(loop_connection, 5)
            assert await batch(loop_connection, 6) == []
        finally:
            await loop_connection.close()

    asyncio.run(scenario())


def rows_read_from_the_task_table(plan: list[dict[str, Any]]) -> int:
    """Rows that the scans of the task table in an ``EXPLAIN (ANALYZE, FORMAT JSON)`` read, kept or not."""

    def read(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == Task._meta.db_table:
            own = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        return own + sum(read(child) for child in node.get("Plans", []))

    return read(plan[0]["Plan"])


@pytest.mark.parametrize("statistics", ["analyzed empty", "of finished tasks only", "of a queue in a burst"])
def test_plans_made_when_statements_are_prepared_read_few_rows_whatever_the_statistics_said(statistics):
    """The generic plans of a loop connection, made on a table just large enough to prepare them, then run on a
    large one: the statistics were taken at plan time and say nothing of a backlog or of many assigned tasks.
    """
    process_id = new_process()
    for n in range(8):
        Connection.objects.create(
            channel_name=f"worker.{n}", role=Connection.Role.WORKER, process_id=process_id, ready_at=NOW
        )
    if statistics == "analyzed empty":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE broker_task")
    fill_task_table(pgloop.PREPARED_FROM_PAGES, state="queued" if statistics == "of a queue in a burst" else "done")
    if statistics != "analyzed empty":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE broker_task")
            cursor.execute("UPDATE broker_task SET state = 'done'")  # the burst was worked off
    statements = {
        "dispatch": (pgloop.DISPATCH, "(now(), now(), %(ids)s, %(workers)s, '{a,b,c}', true, %(finished)s)"),
        "new_tasks": (pgloop.NEW_TASKS, "(now(), '{a}', '{b}', '{c}', '{3}', '{NULL}')"),
    }
    with psycopg.connect(**pgloop.connection_params(), autocommit=True, options=pgloop.PLANNER_SETTINGS) as own:
        for name, (statement, _) in statements.items():
            own.execute(f"PREPARE {name} AS {statement}")
        # Then: 100,000 more finished tasks, a backlog of 5,000, and 2,000 assigned to the workers.
        own.execute(
            "INSERT INTO broker_task (message_id, reply_channel, data, state, attempts, failures, max_attempts,"
            " last_error, created_at, worker_id) SELECT 'later' || g, 'client.a', 'x',"
            " CASE WHEN g % 20 = 0 THEN 'queued' WHEN g % 50 = 1 THEN 'assigned' ELSE 'done' END, 1, 0, 3, '', now(),"
            " CASE WHEN g % 50 = 1 THEN (SELECT min(id) FROM broker_connection) + g % 8 END"
            " FROM generate_series(1, 100000) AS g"
        )
        held = own.execute("SELECT id, worker_id FROM broker_task WHERE state = 'assigned' LIMIT 3").fetchall()
        finished = own.execute("SELECT id FROM broker_task WHERE state = 'done' ORDER BY id DESC LIMIT 3").fetchall()
        values = {
            "ids": f"'{{{','.join(str(i) for i, _ in held)}}}'",
            "workers": f"'{{{','.join(str(w) for _, w in held)}}}'",
            "finished": f"'{{{','.join(str(i) for (i,) in finished)}}}'",
        }
        for name, (_, arguments) in statements.items():
            own.execute("BEGIN")
            (plan,) = own.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}{arguments % values}").fetchone()
            own.execute("ROLLBACK")
            # Three completions, three refills, their workers, three delivery marks: a few dozen rows, of 100,000.
            assert rows_read_from_the_task_table(plan) < 50, f"{name}: {plan}"


# --- the group commit's use of it -------------------------------------------------------------


async def _group_commit_batch(operations: list[Operation]) -> list[BaseException | None]:
    """Each operation's error (None if it went through), the operations queued together."""
    group = commits.group_commit()
    try:
        return await asyncio.gather(*(group.submit(operation) for operation in operations), return_exceptions=True)
    finally:
        await commits.close_group_commit()


def test_a_batch_that_fails_on_the_loop_runs_again_in_the_database_thread(monkeypatch):
    process_id = new_process()
    Connection.objects.create(channel_name="worker.w", role=Connection.Role.WORKER, process_id=process_id, ready_at=NOW)
    monkeypatch.setattr(pgloop, "DISPATCH", "SELECT no_such_column FROM broker_task")
    loop_batches: list[int] = []
    run = pgloop.LoopConnection.run

    async def counted(self, script, count):
        loop_batches.append(count)
        return await run(self, script, count)

    monkeypatch.setattr(pgloop.LoopConnection, "run", counted)

    results = asyncio.run(_group_commit_batch([Submit("client.a", None, "m1", "one")]))

    assert results == [None]
    assert loop_batches == [1]  # tried on the loop first
    task = Task.objects.get(message_id="m1")
    assert task.state == Task.State.ASSIGNED and task.worker.channel_name == "worker.w"  # by the thread


def test_the_group_commit_sends_written_out_batches_from_the_loop_and_closes_its_connection_when_told(monkeypatch):
    loop_batches: list[int] = []
    connections_open: list[pgloop.LoopConnection] = []
    run, open_ = pgloop.LoopConnection.run, pgloop.LoopConnection.open.__func__

    async def counted(self, script, count):
        loop_batches.append(count)
        return await run(self, script, count)

    async def opened(cls):
        connections_open.append(await open_(cls))
        return connections_open[-1]

    monkeypatch.setattr(pgloop.LoopConnection, "run", counted)
    monkeypatch.setattr(pgloop.LoopConnection, "open", classmethod(opened))

    async def scenario() -> None:
        group = commits.group_commit()
        await asyncio.gather(*(group.submit(Submit("client.a", None, f"m{n}", "x")) for n in range(5)))
        await group.submit(Submit("client.a", None, "m5", "x"))
        assert connections_open[0].usable
        await commits.close_group_commit()
        assert not connections_open[0].usable

    asyncio.run(scenario())

    assert sum(loop_batches) == 6 and len(connections_open) == 1
    assert Task.objects.filter(state=Task.State.QUEUED).count() == 6


def test_a_loop_connection_the_server_dropped_costs_one_batch_in_the_thread_and_is_replaced(monkeypatch):
    opened: list[pgloop.LoopConnection] = []
    open_ = pgloop.LoopConnection.open.__func__

    async def recording(cls):
        opened.append(await open_(cls))
        return opened[-1]

    monkeypatch.setattr(pgloop.LoopConnection, "open", classmethod(recording))

    async def scenario() -> None:
        group = commits.group_commit()
        try:
            await group.submit(Submit("client.a", None, "m1", "x"))
            cursor = await opened[0]._connection.execute("SELECT pg_backend_pid()")
            (backend,) = await cursor.fetchone()
            async with await psycopg.AsyncConnection.connect(**pgloop.connection_params(), autocommit=True) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", [backend])  # as a restarted server would
            await group.submit(Submit("client.a", None, "m2", "x"))  # fails on the loop, runs in the thread
            await group.submit(Submit("client.a", None, "m3", "x"))
            assert len(opened) == 2 and opened[1].usable
        finally:
            await commits.close_group_commit()

    asyncio.run(scenario())
    assert sorted(Task.objects.values_list("message_id", flat=True)) == ["m1", "m2", "m3"]


# --- a connection lost with a batch's answer ----------------------------------------------------


def held_and_idle_workers() -> tuple[list[Operation], Task]:
    """A worker that holds a task and an idle one; a batch that completes the task and submits two more."""
    process_id = new_process()
    busy = Connection.objects.create(
        channel_name="worker.busy", role=Connection.Role.WORKER, process_id=process_id, in_flight=1, ready_at=NOW
    )
    Connection.objects.create(
        channel_name="worker.idle", role=Connection.Role.WORKER, process_id=process_id, ready_at=NOW
    )
    held = Task.objects.create(
        message_id="held", reply_channel="client.a", data="mine", max_attempts=3, state="assigned", worker=busy
    )
    operations: list[Operation] = [
        Complete(busy.pk, busy.channel_name, str(held.pk), "MINE"),
        Submit("client.b", None, "m1", "one"),
        Submit("client.b", None, "m2", "two"),
    ]
    return operations, held


def assert_ran_once(held: Task) -> None:
    """The batch of held_and_idle_workers() committed exactly once: the completion took, each task stored once."""
    held.refresh_from_db()
    assert (held.state, held.result) == (Task.State.DONE, "MINE")
    tasks = Task.objects.filter(message_id__in=["m1", "m2"]).order_by("pk")
    # The idle worker first (the assignment round), then the one that just freed its slot (the refill).
    assert [(task.message_id, task.state, task.worker.channel_name) for task in tasks] == [
        ("m1", Task.State.ASSIGNED, "worker.idle"),
        ("m2", Task.State.ASSIGNED, "worker.busy"),
    ]


async def _through_proxy(monkeypatch) -> CuttingProxy:
    """Route the loop's connections through a CuttingProxy in front of the test database."""
    direct = pgloop.connection_params()
    proxy = await CuttingProxy(direct["host"], int(direct["port"])).start()
    proxied = direct | {"host": "127.0.0.1", "port": proxy.listening_port, "sslmode": "disable"}
    monkeypatch.setattr(pgloop, "connection_params", lambda: dict(proxied))
    return proxy


async def _cut_batch(
    proxy: CuttingProxy, operations: list[Operation], how: Cut, then_refuse: int = 0
) -> list[BaseException | None]:
    """Run ``operations`` as one batch of the group commit, its connection cut as ``how`` says."""
    group = commits.group_commit()
    await group.submit(MarkDelivered([]))  # the loop's connection is open before the proxy is armed
    proxy.arm(how, then_refuse=then_refuse)
    results = await asyncio.gather(*(group.submit(operation) for operation in operations), return_exceptions=True)
    assert proxy.cut.is_set()
    return results


def test_a_batch_that_committed_but_whose_answer_was_lost_is_not_run_again_and_its_outcomes_go_out(monkeypatch):
    operations, held = held_and_idle_workers()
    events: dict[str, dict[str, Any]] = {}

    async def scenario() -> list[BaseException | None]:
        proxy = await _through_proxy(monkeypatch)
        try:
            results = await _cut_batch(proxy, operations, "after_answer")
            layer = get_channel_layer()
            for channel in ("client.a", "worker.idle", "worker.busy"):
                events[channel] = await asyncio.wait_for(layer.receive(channel), 5)
            return results
        finally:
            await commits.close_group_commit()
            await proxy.close()

    assert asyncio.run(scenario()) == [None, None, None]
    assert_ran_once(held)
    assert (events["client.a"]["type"], events["client.a"]["data"]) == ("task.outcome", "MINE")
    assert (events["worker.idle"]["type"], events["worker.idle"]["data"]) == ("task.assign", "one")
    assert (events["worker.busy"]["type"], events["worker.busy"]["data"]) == ("task.assign", "two")


def test_a_batch_cut_off_while_the_server_still_runs_it_is_ended_there_and_runs_again_once(monkeypatch):
    operations, held = held_and_idle_workers()
    run_in_thread = commits.run_batch

    async def scenario() -> list[BaseException | None]:
        proxy = await _through_proxy(monkeypatch)
        # Another transaction holds the task's row: the batch waits for it on the server.
        locker = await psycopg.AsyncConnection.connect(**pgloop.connection_params() | {"port": proxy.port})
        await locker.execute(f"SELECT id FROM {Task._meta.db_table} WHERE id = %s FOR UPDATE", [held.pk])

        async def unlocked_first(batch: list[Operation]) -> Any:
            # Whatever still waits for the lock goes on now: a server process that was
            # not ended would commit the batch beside this run of it.
            await locker.rollback()
            return await run_in_thread(batch)

        monkeypatch.setattr(commits, "run_batch", unlocked_first)
        try:
            return await _cut_batch(proxy, operations, "after_sync")
        finally:
            await commits.close_group_commit()
            await locker.close()
            await proxy.close()

    assert asyncio.run(scenario()) == [None, None, None]
    assert_ran_once(held)


@pytest.mark.parametrize("refused", [1, 100])
def test_a_batch_whose_answer_was_lost_is_looked_for_again_and_fails_rather_than_run_again_blindly(
    monkeypatch, refused
):
    """The database out of reach for a moment (one connection refused), or for good."""
    operations, held = held_and_idle_workers()
    monkeypatch.setattr(dispatch, "SETTLE_RETRY_SECONDS", 0.01)
    thread_batches: list[int] = []
    run_in_thread = commits.run_batch

    async def counted(batch: list[Operation]) -> Any:
        thread_batches.append(len(batch))
        return await run_in_thread(batch)

    monkeypatch.setattr(commits, "run_batch", counted)

    async def scenario() -> list[BaseException | None]:
        proxy = await _through_proxy(monkeypatch)
        try:
            return await _cut_batch(proxy, operations, "after_answer", then_refuse=refused)
        finally:
            await commits.close_group_commit()
            await proxy.close()

    results = asyncio.run(scenario())

    if refused < dispatch.SETTLE_ATTEMPTS:
        assert results == [None, None, None]  # found at the next look
    else:
        # Each operation fails (its connection closes: its peer learns nothing went through for sure).
        assert all(isinstance(result, DatabaseError) for result in results), results
    # Nothing ran twice: the batch had committed, once.
    assert thread_batches == []
    assert_ran_once(held)
