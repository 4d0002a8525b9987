"""Batches on PostgreSQL in fewer round trips (``broker.postgres``): what they save, and what they keep.

PostgreSQL only (the suite's second pass): on SQLite there is nothing to test.
The batches run outside any transaction of Django's, as in a broker process,
hence ``transaction=True``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from django.db import DataError, connection, transaction

from broker import dispatch, postgres
from broker.dispatch import Complete, MarkDelivered, Submit
from broker.models import Task

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the pipeline is PostgreSQL's"),
    pytest.mark.django_db(transaction=True),
]

# The steps of psycopg that wait for the server's answer (a round trip) when no pipeline is open,
# and those that end a pipeline (everything in it is one round trip). Only for connections in
# autocommit mode: otherwise psycopg's own BEGIN hides inside the first _execute_gen.
_ANSWERED_AT_ONCE = {"_execute_gen", "_commit_gen", "_rollback_gen", "_exec_command"}
_PIPELINE_SYNCS = {"_exit_gen", "_sync_gen"}


@pytest.fixture
def round_trips(monkeypatch) -> Iterator[list[str]]:
    """The round trips to PostgreSQL of this thread's psycopg connections, by the step that made each."""
    import psycopg

    trips: list[str] = []
    wait = psycopg.Connection.wait

    def counting_wait(self, gen, *args, **kwargs):
        step = getattr(gen, "__name__", "")
        if step in _PIPELINE_SYNCS or (step in _ANSWERED_AT_ONCE and self._pipeline is None):
            trips.append(step)
        return wait(self, gen, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "wait", counting_wait)
    yield trips


@pytest.fixture(autouse=True)
def production_like(settings):
    settings.DEBUG = False  # Django logs no queries (it would, and the pipeline would step aside)


def busy_worker() -> tuple[int, str]:
    """A worker holding one task (its only slot); returns its connection id and the task's id."""
    process_id, _ = dispatch.register_process(f"host-{uuid.uuid4().hex[:8]}", os.getpid())
    worker_id = dispatch.register_worker(process_id, "worker.busy", 1).connection_id
    (held,) = dispatch.submit_task("client.a", None, "held", "x").assignments
    return worker_id, held.task_id


def test_a_batch_of_submissions_for_busy_workers_takes_two_round_trips(round_trips):
    busy_worker()
    delivered = Task.objects.get(message_id="held").pk
    operations = [Submit("client.a", None, f"m{n}", "x") for n in range(3)] + [MarkDelivered([delivered])]

    round_trips.clear()
    errors, effects = dispatch.run_batch(operations, postgres.pipelined(connection))

    assert errors == [None] * 4 and not effects
    # BEGIN and the INSERT travel with the look-up of idle workers, the delivery mark with the COMMIT
    # (in Django's transaction, each of those five is a round trip of its own).
    assert len(round_trips) == 2, round_trips
    assert Task.objects.filter(state=Task.State.QUEUED).count() == 3
    assert Task.objects.get(pk=delivered).delivered_at is not None


def test_a_completion_and_the_next_task_for_its_worker_commit_together_in_three_round_trips(round_trips):
    worker_id, held = busy_worker()
    dispatch.submit_task("client.a", None, "next", "y")

    round_trips.clear()
    errors, effects = dispatch.run_batch(
        [Complete(worker_id, "worker.busy", held, "X")], postgres.pipelined(connection)
    )

    assert errors == [None]
    assert len(round_trips) == 3, round_trips  # BEGIN with the completion, the refill, the COMMIT
    assert [(outcome.message_id, outcome.data) for outcome in effects.outcomes] == [("held", "X")]
    assert [assignment.data for assignment in effects.assignments] == ["y"]
    assert dict(Task.objects.values_list("message_id", "state")) == {"held": "done", "next": "assigned"}


def test_an_error_in_a_statement_sent_ahead_is_told_to_the_operation_that_made_it():
    """The INSERT of the bad one fails at the next statement read: the batch runs again one by one."""
    busy_worker()
    too_long = "m" * 300  # messageId is at most 256 characters in the database

    errors, _ = dispatch.run_batch(
        [
            Submit("client.a", None, "m1", "x"),
            Submit("client.a", None, too_long, "x"),
            Submit("client.a", None, "m2", "x"),
        ],
        postgres.pipelined(connection),
    )

    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], DataError)
    assert set(Task.objects.values_list("message_id", flat=True)) == {"held", "m1", "m2"}
    # The connection is left clean: the next batch goes the short way again.
    errors, _ = dispatch.run_batch([Submit("client.a", None, "m3", "x")], postgres.pipelined(connection))
    assert errors == [None]
    assert connection.get_autocommit() and Task.objects.filter(message_id="m3").exists()


def test_a_lone_operation_that_fails_there_is_tried_in_djangos_transaction_and_raises():
    busy_worker()

    with pytest.raises(DataError):
        dispatch.run_batch([Submit("client.a", None, "m" * 300, "x")], postgres.pipelined(connection))

    assert not Task.objects.filter(state=Task.State.QUEUED).exists()


def test_a_client_id_submission_keeps_its_savepoint_and_a_repeat_is_still_a_repeat():
    busy_worker()
    first = Submit("client.a", "client-1", "again", "x")

    errors, _ = dispatch.run_batch([first, first], postgres.pipelined(connection))

    assert errors == [None, None]
    assert Task.objects.filter(client_id="client-1").count() == 1


def test_inside_a_transaction_of_djangos_a_batch_joins_it():
    with transaction.atomic():
        assert postgres.pipelined(connection) is None


def test_off_by_setting(settings):
    settings.TURTLEMQ_PG_PIPELINE = False
    assert postgres.pipelined(connection) is None
