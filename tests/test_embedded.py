"""SQLite batches on the event loop (``broker.embedded``), and what happens when they cannot run there.

The test database is a file (``turtlemq_site.settings``), so the group commit
runs its batches on the loop as a served broker does.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError, connection

from broker import commits, dispatch, embedded
from broker.dispatch import Submit
from broker.models import Task
from tests.test_group_commit import new_process, states, worker

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "sqlite", reason="the event loop's own connection is SQLite's"),
]


@pytest.fixture
def thread_batches(monkeypatch) -> list[int]:
    """Sizes of the batches that took the database thread."""
    sizes: list[int] = []
    real = commits.run_batch

    async def counting(operations: list[dispatch.Operation]) -> Any:
        sizes.append(len(operations))
        return await real(operations)

    monkeypatch.setattr(commits, "run_batch", counting)
    return sizes


async def test_task_batches_run_on_the_event_loop_and_are_committed_before_they_are_announced(
    thread_batches, peers, settings
):
    settings.TURTLEMQ_TICK = 3600  # housekeeping's writes would make a batch find the file locked
    worker_peer = await peers.worker()
    client = await peers.client()
    await client.submit("m1", "one")
    task = await worker_peer.next_task()
    # Committed before it was sent: another connection (the database thread's) sees it assigned.
    assert await database_sync_to_async(states)() == {"m1": "assigned"}
    await worker_peer.respond(task, "ONE")
    assert (await client.expect("RESPONSE_TASK"))["data"] == "ONE"
    assert thread_batches == []


async def test_a_batch_that_finds_the_database_locked_takes_the_database_thread_which_waits_its_turn(thread_batches):
    process_id = await database_sync_to_async(new_process)()
    await database_sync_to_async(worker)(process_id, "w")
    group = commits.GroupCommit()
    other = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        submitted = group.submit(Submit("client.a", None, "m1", "one"))
        await asyncio.sleep(0.3)
        assert not submitted.done()  # waiting for the lock in the thread, not failed
    finally:
        other.execute("ROLLBACK")
        other.close()
    await asyncio.wait_for(submitted, 10)
    assert thread_batches == [1]
    assert await database_sync_to_async(states)() == {"m1": "assigned"}


@pytest.mark.parametrize(
    "failure",
    [embedded.Busy("database is locked"), OperationalError("unable to open database file")],
    ids=["locked", "broken"],
)
async def test_a_batch_that_cannot_open_the_loops_connection_takes_the_database_thread_and_the_next_opens_it(
    thread_batches, monkeypatch, failure
):
    # As when another connection recovers the log of a WAL database (the first to open it after the last closed).
    real = embedded.open_for_loop
    opened: list[str] = []

    def failing_once() -> embedded.LoopConnection:
        if not opened:
            opened.append("failed")
            raise failure
        opened.append("opened")
        return real()

    monkeypatch.setattr(embedded, "open_for_loop", failing_once)
    process_id = await database_sync_to_async(new_process)()
    await database_sync_to_async(worker)(process_id, "w")
    group = commits.GroupCommit()
    await asyncio.wait_for(group.submit(Submit("client.a", None, "m1", "one")), 10)
    await asyncio.wait_for(group.submit(Submit("client.a", None, "m2", "two")), 10)
    assert opened == ["failed", "opened"]
    assert thread_batches == [1]  # the second ran on the loop
    assert await database_sync_to_async(states)() == {"m1": "assigned", "m2": "queued"}


class FailsOnTheLoop(dispatch.Operation):
    """Stores a task, then fails, but only on the event loop's connection."""

    sql_only = True

    def apply(self, batch: dispatch.Batch) -> None:
        batch.sql.insert_tasks([("marker", None, "client.a", "x", None, 1)], batch.now)
        if batch.sql.on_loop:
            raise OperationalError("the loop's connection gave up")


async def test_a_batch_that_fails_on_the_loop_leaves_nothing_there_and_runs_again_in_the_thread(thread_batches):
    await database_sync_to_async(new_process)()
    group = commits.GroupCommit()
    await asyncio.wait_for(group.submit(FailsOnTheLoop()), 10)
    assert thread_batches == [1]
    assert await database_sync_to_async(lambda: list(Task.objects.values_list("message_id", flat=True)))() == ["marker"]


async def test_the_database_thread_checkpoints_the_log_that_the_loop_writes(monkeypatch):
    monkeypatch.setattr(embedded, "CHECKPOINT_EVERY", 3)
    checkpoints: list[tuple[int, int, int]] = []
    real = embedded.checkpoint

    def counting() -> tuple[int, int, int]:
        answer = real()
        checkpoints.append(answer)
        return answer

    monkeypatch.setattr(embedded, "checkpoint", counting)
    process_id = await database_sync_to_async(new_process)()
    await database_sync_to_async(worker)(process_id, "w", 100)
    group = commits.GroupCommit()
    deadline = asyncio.get_running_loop().time() + 10
    submitted = 0
    while len(checkpoints) < 2:
        # While a checkpoint runs, the loop's batches take the thread and do not count: how many
        # batches two checkpoints take depends on the machine's speed, not whether they come.
        assert asyncio.get_running_loop().time() < deadline, f"{checkpoints} after {submitted} batches"
        await group.submit(Submit("client.a", None, f"m{submitted}", str(submitted)))
        submitted += 1
        await database_sync_to_async(lambda: None)()  # the checkpoints run in that thread, unawaited: after them
    # Each copied the whole log, so that the next writer starts it afresh.
    assert all(busy == 0 and copied == frames for busy, frames, copied in checkpoints), checkpoints
