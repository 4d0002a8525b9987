"""A batch in the database thread whose connection to PostgreSQL breaks (``dispatch._settle_lost``).

PostgreSQL only (the suite's second pass). Django's connection goes through a
real TCP proxy (``tests.pgproxy``) that can lose the answer to a COMMIT the
server carried out: the one case where running the batch again would do its
work twice. The same case on the event loop's own connection is in
``tests/test_pgloop.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import psycopg
import pytest
from django.db import DatabaseError, connection

from broker import dispatch, pgloop, postgres
from broker.dispatch import Submit
from broker.models import Task

from .pgproxy import CuttingProxy
from .test_pgloop import assert_ran_once, held_and_idle_workers

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL connection is lost here")


@pytest.fixture
def proxy(transactional_db) -> Iterator[CuttingProxy]:
    """Django's connection through a CuttingProxy (served by an event loop in a thread of its own)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings_dict = connection.settings_dict
    saved = settings_dict["HOST"], settings_dict["PORT"], dict(settings_dict["OPTIONS"])
    started = CuttingProxy(saved[0] or "127.0.0.1", int(saved[1] or 5432)).start()
    cutting = asyncio.run_coroutine_threadsafe(started, loop).result(5)
    connection.close()
    settings_dict["HOST"], settings_dict["PORT"] = "127.0.0.1", cutting.listening_port
    settings_dict["OPTIONS"]["sslmode"] = "disable"
    try:
        yield cutting
    finally:
        connection.close()
        settings_dict["HOST"], settings_dict["PORT"], settings_dict["OPTIONS"] = saved
        asyncio.run_coroutine_threadsafe(cutting.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def a_batch_of_the_thread() -> tuple[list[dispatch.Operation], Task]:
    """held_and_idle_workers()'s batch, one submission with a clientId (such a batch takes the thread)."""
    operations, held = held_and_idle_workers()
    operations[2] = Submit("client.b", "client-b", "m2", "two")
    return operations, held


def test_a_batch_that_committed_but_whose_answer_was_lost_is_not_run_again_and_what_it_wrote_goes_out(proxy):
    operations, held = a_batch_of_the_thread()
    connection.ensure_connection()
    proxy.arm("after_answer", on=b"COMMIT")

    errors, effects = dispatch.run_batch(operations)

    assert proxy.cut.is_set()
    # Not run again (each task stored once); the rows show each operation went through ...
    assert_ran_once(held)
    assert errors == [None, None, None]
    # ... and what it handed out and finished goes out.
    assert [(outcome.reply_channel, outcome.data) for outcome in effects.outcomes] == [("client.a", "MINE")]
    assert sorted((assignment.worker_channel, assignment.data) for assignment in effects.assignments) == [
        ("worker.busy", "two"),
        ("worker.idle", "one"),
    ]


@pytest.mark.parametrize("pipelined", [False, True], ids=["django transaction", "broker.postgres pipeline"])
def test_a_connection_that_died_before_the_batch_costs_nothing_but_a_new_one(proxy, pipelined):
    operations, held = a_batch_of_the_thread()
    connection.ensure_connection()
    with psycopg.connect(**pgloop.connection_params(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [connection.connection.info.backend_pid])

    errors, effects = dispatch.run_batch(operations, postgres.pipelined(connection) if pipelined else None)

    assert errors == [None, None, None]  # nothing of it had committed: run again, one by one
    assert_ran_once(held)
    assert [(outcome.reply_channel, outcome.data) for outcome in effects.outcomes] == [("client.a", "MINE")]


def test_a_pipelined_batch_cut_off_at_a_savepoint_is_ended_on_the_server_and_runs_again_once(proxy):
    operations, held = a_batch_of_the_thread()  # the clientId's submission takes a savepoint
    connection.ensure_connection()
    proxy.arm("after_sync", on=b"SAVEPOINT")  # the server keeps its side, in the batch's transaction

    errors, effects = dispatch.run_batch(operations, postgres.pipelined(connection))

    assert proxy.cut.is_set()
    assert errors == [None, None, None]  # rolled back where it ran: run again, one by one
    assert_ran_once(held)
    assert [(outcome.reply_channel, outcome.data) for outcome in effects.outcomes] == [("client.a", "MINE")]


def test_an_operation_of_a_committed_batch_whose_answer_does_not_show_in_the_rows_fails(proxy):
    operations, held = a_batch_of_the_thread()
    busy = held.worker
    operations.append(dispatch.Complete(busy.pk, busy.channel_name, "424242", "no such task"))  # refused
    connection.ensure_connection()
    proxy.arm("after_answer", on=b"COMMIT")

    errors, _ = dispatch.run_batch(operations)

    assert errors[:3] == [None, None, None]
    # Its refusal was lost with the rest of the answer: its connection closes, and its peer starts afresh.
    assert isinstance(errors[3], DatabaseError)
    assert_ran_once(held)
