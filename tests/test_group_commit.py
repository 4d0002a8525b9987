"""Group commit: many connections' task operations in one transaction, and what each of them learns.

``dispatch.run_batch`` runs a batch against the database directly; the
``GroupCommit`` of ``broker.commits`` and the consumer's pipelining are tested
through their effects: fewer transactions than operations, every caller told
how its own operation went, and nothing of one operation lost to another's error.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError

from broker import commits, dispatch, pgloop
from broker.dispatch import Complete, Fail, MarkDelivered, Release, Submit, UnknownTask
from broker.models import Connection, Task
from tests.communicators import wait_until


@pytest.fixture
async def group():
    """A group commit of its own, closed after the test (on PostgreSQL it holds a connection of its own)."""
    opened = commits.GroupCommit()
    yield opened
    await opened.close()


def new_process() -> int:
    process_id, _ = dispatch.register_process(f"host-{uuid.uuid4().hex[:8]}", os.getpid())
    return process_id


def worker(process_id: int, name: str, concurrency: int = 1) -> int:
    return dispatch.register_worker(process_id, f"worker.{name}", concurrency).connection_id


def states() -> dict[str, str]:
    return dict(Task.objects.values_list("message_id", "state"))


def assert_only_the_middle_one_failed(errors: list[Any], effects: dispatch.Effects, error: type) -> None:
    """Of submit m1, a failing operation, submit m2 (one free worker): both tasks stored, m1 handed out."""
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], error)
    assert states() == {"m1": "assigned", "m2": "queued"}
    assert [a.data for a in effects.assignments] == ["one"]


def a_busy_worker_and_a_queued_task() -> tuple[int, dispatch.Assignment]:
    """Worker ``worker.w`` holds m1 ("one"); m2 ("two") waits in the queue."""
    worker_id = worker(new_process(), "w")
    (first,) = dispatch.submit_task("client.a", None, "m1", "one").assignments
    dispatch.submit_task("client.a", None, "m2", "two")
    return worker_id, first


@dataclass(frozen=True)
class Explodes(dispatch.Operation):
    """An operation whose statement fails in the database (as a deadlock or a lost connection would)."""

    def apply(self, batch: dispatch.Batch) -> None:
        raise OperationalError("the database gave up on this statement")


# --- one batch, run directly --------------------------------------------------------------


@pytest.mark.django_db
def test_a_refused_operation_leaves_the_rest_of_its_batch_to_commit():
    process_id = new_process()
    worker_id = worker(process_id, "w")

    errors, effects = dispatch.run_batch(
        [
            Submit("client.a", None, "m1", "one"),
            Complete(worker_id, "worker.w", "999999", "no such task"),
            Submit("client.a", None, "m2", "two"),
        ]
    )

    assert_only_the_middle_one_failed(errors, effects, UnknownTask)


@pytest.mark.django_db
def test_a_completion_and_the_next_task_for_that_worker_come_out_of_one_batch():
    worker_id, first = a_busy_worker_and_a_queued_task()

    errors, effects = dispatch.run_batch(
        [Complete(worker_id, "worker.w", first.task_id, "ONE"), MarkDelivered([int(first.task_id)])]
    )

    assert errors == [None, None]
    assert [(o.message_id, o.data) for o in effects.outcomes] == [("m1", "ONE")]
    assert [(a.worker_channel, a.data) for a in effects.assignments] == [("worker.w", "two")]
    assert Task.objects.get(message_id="m1").delivered_at is not None
    assert states() == {"m1": "done", "m2": "assigned"}


@pytest.mark.django_db
def test_a_task_submitted_in_the_batch_where_a_worker_frees_up_goes_to_the_worker_idle_for_longer():
    process_id = new_process()
    busy = worker(process_id, "busy")
    (held,) = dispatch.submit_task("client.a", None, "m1", "one").assignments
    worker(process_id, "idle")

    errors, effects = dispatch.run_batch(
        [Complete(busy, "worker.busy", held.task_id, "ONE"), Submit("client.a", None, "m2", "two")]
    )

    assert errors == [None, None]
    assert [(a.worker_channel, a.data) for a in effects.assignments] == [("worker.idle", "two")]


@pytest.mark.django_db
def test_the_same_message_id_twice_in_one_batch_is_one_task():
    errors, _ = dispatch.run_batch([Submit("client.a", "app", "m1", "x"), Submit("client.b", "app", "m1", "x")])

    assert errors == [None, None]
    assert Task.objects.filter(client_id="app", message_id="m1").count() == 1


@pytest.mark.django_db
def test_a_worker_released_in_the_batch_that_freed_its_slot_gets_no_new_task():
    worker_id, first = a_busy_worker_and_a_queued_task()

    errors, effects = dispatch.run_batch([Complete(worker_id, "worker.w", first.task_id, "ONE"), Release(worker_id)])

    assert errors == [None, None]
    assert effects.assignments == []
    assert states() == {"m1": "done", "m2": "queued"}


@pytest.mark.django_db
def test_the_same_completion_twice_in_one_batch_completes_the_task_once_and_refuses_the_repeat():
    worker_id, first = a_busy_worker_and_a_queued_task()

    errors, effects = dispatch.run_batch(
        [Complete(worker_id, "worker.w", first.task_id, "ONE"), Complete(worker_id, "worker.w", first.task_id, "1")]
    )

    assert errors[0] is None and isinstance(errors[1], UnknownTask)
    assert [(o.message_id, o.data) for o in effects.outcomes] == [("m1", "ONE")]
    assert Task.objects.get(message_id="m1").result == "ONE"
    assert [a.data for a in effects.assignments] == ["two"]  # one slot freed, one task handed out


@pytest.mark.django_db
def test_of_two_workers_completing_one_task_in_one_batch_only_the_one_holding_it_is_heard():
    process_id = new_process()
    holder = worker(process_id, "a")
    (held,) = dispatch.submit_task("client.a", None, "m1", "one").assignments
    other = worker(process_id, "b")

    errors, effects = dispatch.run_batch(
        [Complete(other, "worker.b", held.task_id, "wrong"), Complete(holder, "worker.a", held.task_id, "ONE")]
    )

    assert isinstance(errors[0], UnknownTask) and errors[1] is None
    assert [o.data for o in effects.outcomes] == ["ONE"]


@pytest.mark.django_db
def test_workers_freed_in_one_batch_take_the_oldest_tasks_in_the_order_they_freed_up():
    process_id = new_process()
    workers = [worker(process_id, name) for name in ("a", "b", "c")]
    held = {a.worker_channel: a for n in range(3) for a in dispatch.submit_task("c", None, f"h{n}", "h").assignments}
    for n in range(5):
        dispatch.submit_task("c", None, f"q{n}", f"queued {n}")

    freeing = [(workers[2], "worker.c"), (workers[0], "worker.a"), (workers[1], "worker.b")]
    errors, effects = dispatch.run_batch(
        [Complete(worker_id, channel, held[channel].task_id, "done") for worker_id, channel in freeing]
    )

    assert errors == [None, None, None]
    assert [(a.worker_channel, a.data) for a in effects.assignments] == [
        ("worker.c", "queued 0"),
        ("worker.a", "queued 1"),
        ("worker.b", "queued 2"),
    ]


@pytest.mark.django_db
def test_workers_that_freed_more_slots_than_tasks_are_queued_get_what_there_is_and_give_the_rest_back():
    process_id = new_process()
    two_slots, one_slot = worker(process_id, "a", concurrency=2), worker(process_id, "b")
    held: dict[str, list[str]] = {}
    for n in range(3):
        for assignment in dispatch.submit_task("c", None, f"h{n}", "h").assignments:
            held.setdefault(assignment.worker_channel, []).append(assignment.task_id)
    dispatch.submit_task("c", None, "q0", "the only queued task")

    completions = [Complete(two_slots, "worker.a", task_id, "done") for task_id in held["worker.a"]]
    completions += [Complete(one_slot, "worker.b", task_id, "done") for task_id in held["worker.b"]]
    errors, effects = dispatch.run_batch(completions)

    assert errors == [None, None, None]
    assert [(a.worker_channel, a.data) for a in effects.assignments] == [("worker.a", "the only queued task")]
    assert dict(Connection.objects.filter(pk__in=[two_slots, one_slot]).values_list("pk", "in_flight")) == {
        two_slots: 1,
        one_slot: 0,
    }
    assert states()["q0"] == Task.State.ASSIGNED


@pytest.mark.django_db
def test_tasks_submitted_in_one_batch_are_stored_in_the_order_they_came():
    count = 250  # more than one INSERT statement holds
    errors, _ = dispatch.run_batch([Submit("client.a", None, f"m{n}", str(n)) for n in range(count)])

    assert errors == [None] * count
    by_id = list(Task.objects.order_by("pk").values_list("message_id", flat=True))
    assert by_id == [f"m{n}" for n in range(count)]


@pytest.mark.django_db
def test_an_operation_after_a_completion_in_its_batch_sees_the_task_completed():
    worker_id, first = a_busy_worker_and_a_queued_task()

    errors, _ = dispatch.run_batch(
        [Complete(worker_id, "worker.w", first.task_id, "ONE"), Fail(worker_id, "worker.w", first.task_id, "late")]
    )

    assert errors[0] is None and isinstance(errors[1], UnknownTask)
    assert Task.objects.get(message_id="m1").state == Task.State.DONE


@pytest.mark.django_db
def test_when_the_batch_fails_as_a_whole_each_operation_runs_alone():
    process_id = new_process()
    worker(process_id, "w")

    errors, effects = dispatch.run_batch(
        [Submit("client.a", None, "m1", "one"), Explodes(), Submit("client.a", None, "m2", "two")]
    )

    assert_only_the_middle_one_failed(errors, effects, OperationalError)


@pytest.mark.django_db
def test_a_lone_operation_that_fails_in_the_database_raises():
    with pytest.raises(OperationalError):
        dispatch.run_batch([Explodes()])


# --- the group commit of a broker process ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_operations_queued_together_share_transactions_and_each_caller_hears_its_own_outcome(monkeypatch, group):
    process_id = await database_sync_to_async(new_process)()
    worker_id = await database_sync_to_async(worker)(process_id, "w", 50)
    batches: list[int] = []
    real_run_batch, real_run_batch_on_loop = commits.run_batch, dispatch.run_batch_on_loop

    async def counting_run_batch(operations: list[dispatch.Operation]) -> Any:
        batches.append(len(operations))
        return await real_run_batch(operations)

    def counting_run_batch_on_loop(operations: list[dispatch.Operation], connection: Any) -> Any:
        outcomes = real_run_batch_on_loop(operations, connection)
        batches.append(len(operations))  # counted once it committed: a busy database sends it to the thread
        return outcomes

    real_run_script = pgloop.LoopConnection.run

    async def counting_run_script(connection: Any, script: dispatch.BatchScript, count: int) -> Any:
        outcomes = await real_run_script(connection, script, count)
        batches.append(count)  # counted once it committed: a failure sends it to the thread
        return outcomes

    # Batches run on the event loop (SQLite; PostgreSQL, those written out whole) or in the database
    # thread (the others, or SQLite while busy).
    monkeypatch.setattr(commits, "run_batch", counting_run_batch)
    monkeypatch.setattr(dispatch, "run_batch_on_loop", counting_run_batch_on_loop)
    monkeypatch.setattr(pgloop.LoopConnection, "run", counting_run_script)

    submits = [group.submit(Submit("client.a", None, f"m{n}", str(n))) for n in range(40)]
    unknown = group.submit(Complete(worker_id, "worker.w", "424242", "nobody asked"))
    await asyncio.gather(*submits)
    with pytest.raises(UnknownTask):
        await unknown

    assert sum(batches) == 41
    assert len(batches) < 41, batches  # queued while the first batch ran: they went together
    assert await database_sync_to_async(Task.objects.assigned().count)() == 40


@pytest.mark.django_db(transaction=True)
async def test_a_delivery_noted_before_an_operation_commits_no_later_than_it(group):
    process_id = await database_sync_to_async(new_process)()
    await database_sync_to_async(worker)(process_id, "w")
    await database_sync_to_async(dispatch.submit_task)("client.a", None, "m1", "one")
    task_id = await database_sync_to_async(lambda: Task.objects.get().pk)()

    group.note_delivered(task_id)
    await group.submit(Submit("client.a", None, "m2", "two"))

    assert await database_sync_to_async(lambda: Task.objects.get(pk=task_id).delivered_at)() is not None


@pytest.mark.django_db(transaction=True)
async def test_delivery_marks_alone_wait_a_moment_for_a_batch_to_ride_along_with_then_are_recorded(group):
    process_id = await database_sync_to_async(new_process)()
    await database_sync_to_async(worker)(process_id, "w")
    await database_sync_to_async(dispatch.submit_task)("client.a", None, "m1", "one")
    task_id = await database_sync_to_async(lambda: Task.objects.get().pk)()

    group.note_delivered(task_id)
    await asyncio.sleep(commits.MARK_DELAY / 5)
    assert await database_sync_to_async(lambda: Task.objects.get(pk=task_id).delivered_at)() is None
    await wait_until(lambda: Task.objects.get(pk=task_id).delivered_at is not None, what="the delivery recorded")


# --- pipelining in the consumer -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_burst_of_submissions_from_one_client_is_answered_in_full_with_errors_where_due(settings, peers):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 150
    worker_peer = await peers.worker(concurrency=200)
    client = await peers.client()
    for n in range(200):
        await client.submit(f"m{n}", str(n))
    # The first 150 are accepted (the in-flight limit), the rest refused, each with its messageId.
    tasks = [await worker_peer.next_task() for _ in range(150)]
    errors = [await client.expect_error("RATE_LIMITED") for _ in range(50)]
    assert sorted(e["ref"]["messageId"] for e in errors) == sorted(f"m{n}" for n in range(150, 200))
    assert sorted(int(t["data"]) for t in tasks) == list(range(150))
    # Accepted in the order sent: task ids rise with the messageIds.
    by_data = sorted(tasks, key=lambda t: int(t["data"]))
    assert [int(t["taskId"]) for t in by_data] == sorted(int(t["taskId"]) for t in tasks)

    for task in tasks:
        await worker_peer.respond(task, task["data"].upper())
    answers = {(await client.expect("RESPONSE_TASK"))["messageId"] for _ in range(150)}
    assert answers == {f"m{n}" for n in range(150)}
    await wait_until(
        lambda: Task.objects.filter(delivered_at__isnull=False).count() == 150, what="every delivery recorded"
    )


@pytest.mark.django_db(transaction=True)
async def test_the_group_commit_runs_whatever_context_its_first_caller_was_in(group):
    """A caller inside asgiref's "database call under way" guard must not make every batch refuse to run."""
    from asgiref.sync import SyncToAsync

    process_id = await database_sync_to_async(new_process)()
    await database_sync_to_async(worker)(process_id, "w")

    SyncToAsync.deadlock_context.set(True)  # as if this task were waiting for a database_sync_to_async call
    try:
        await group.submit(Submit("client.a", None, "m1", "one"))
    finally:
        SyncToAsync.deadlock_context.set(False)

    assert await database_sync_to_async(states)() == {"m1": "assigned"}
