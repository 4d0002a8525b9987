"""The cost of one task from submit to result: database statements and layer messages.

Not a timing test: it counts work, so that a change that adds a query or a
channel-layer hop to the hot path shows up as a failing number.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext

from broker import dispatch
from broker.models import Task
from subscriptions import topics
from turtlemq_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

# Statements per task today, one task at a time (README, "How it is built"):
# submit = insert + free workers + due tasks + take the slot + claim; complete =
# complete + refill (none due) + give the slot back; the delivery mark. A change
# that raises them should be a deliberate one.
MAX_STATEMENTS_PER_TASK = 9
# On PostgreSQL batches are written out whole (broker.pgloop): insert, the dispatch
# that follows it (an assignment round, and the delivery mark of the task before),
# the dispatch of the completion (complete, refill, slots).
MAX_STATEMENTS_PER_TASK_ON_POSTGRESQL = 3
# Client and worker share this process: task.assign and task.outcome are
# delivered in-process (broker.local), so no layer message at all.
MAX_LAYER_MESSAGES_PER_TASK = 0


class StatementCounter:
    """Counts SQL statements on every database connection, in every thread.

    Transaction control is left out (SQLite's BEGIN IMMEDIATE passes through
    here, PostgreSQL's BEGIN and COMMIT do not), so the figures count the same things.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.active = False
        self._lock = threading.Lock()

    def __call__(self, execute, sql, params, many, context):
        if self.active and not sql.startswith("BEGIN"):
            with self._lock:
                self.counts[sql.split()[0].upper()] += 1
        return execute(sql, params, many, context)

    def install(self, sender, connection, **kwargs) -> None:
        # Once per connection object: with CONN_MAX_AGE = 0 (the tests') a
        # connection reconnects for each batch and says so each time.
        if self not in connection.execute_wrappers:
            connection.execute_wrappers.append(self)


async def registered(path: str, frame: dict) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path)
    assert (await communicator.connect())[0]
    await communicator.send_json_to(frame)
    assert await communicator.receive_json_from(timeout=10) == frame
    return communicator


async def test_a_task_costs_few_statements_and_no_layer_message_between_local_peers(monkeypatch, settings):
    settings.TURTLEMQ_TICK = 3600  # keep housekeeping statements out of the count
    counter = StatementCounter()
    connection_created.connect(counter.install)
    layer = get_channel_layer()
    layer_messages: Counter[str] = Counter()
    real_send = layer.send

    async def counting_send(channel, message):
        if counter.active:
            layer_messages[message["type"]] += 1
        await real_send(channel, message)

    monkeypatch.setattr(layer, "send", counting_send)
    try:
        worker = await registered("/", {"type": "REGISTER_WORKER", "data": ""})
        client = await registered("/", {"type": "REGISTER_CLIENT", "data": ""})
        rounds = 20

        async def round_trip(n: int) -> None:
            await client.send_json_to({"type": "REQUEST_TASK", "messageId": f"m{n}", "data": "x"})
            task = await worker.receive_json_from(timeout=10)
            await worker.send_json_to({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "X"})
            assert (await client.receive_json_from(timeout=10))["messageId"] == f"m{n}"

        # Count from after the first result to after the last one: each window
        # holds one whole task, including the delivery mark of the one before.
        await round_trip(0)
        counter.active = True
        for n in range(1, rounds + 1):
            await round_trip(n)
        counter.active = False
        await client.disconnect()
        await worker.disconnect()
    finally:
        connection_created.disconnect(counter.install)

    statements = sum(counter.counts.values()) / rounds
    messages = sum(layer_messages.values()) / rounds
    print(f"per task: {statements:.1f} SQL statements {dict(counter.counts)}, {messages:.1f} layer messages")
    if connection.vendor == "postgresql":
        assert statements <= MAX_STATEMENTS_PER_TASK_ON_POSTGRESQL
    assert statements <= MAX_STATEMENTS_PER_TASK
    assert messages <= MAX_LAYER_MESSAGES_PER_TASK


def test_publishing_a_message_with_no_email_subscriber_costs_three_statements():
    """Count the topic's sequence up, store the message, look for e-mail subscribers."""
    topics.create_topic("hot.path")
    with CaptureQueriesContext(connection) as queries:
        published = topics.publish("hot.path", "hello")

    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    statements = [s for s in statements if s not in ("BEGIN", "SAVEPOINT", "RELEASE", "COMMIT")]
    assert statements == ["UPDATE", "INSERT", "SELECT"]
    assert (published.seq, published.emails) == (1, 0)


class QueryPlans:
    """An execute wrapper that records SQLite's plan of every statement on the task table before running it."""

    def __init__(self) -> None:
        self.plans: list[tuple[str, list[str]]] = []

    def __call__(self, execute, sql, params, many, context):
        if "broker_task" in sql and sql.split()[0].upper() in ("SELECT", "UPDATE", "DELETE", "WITH"):
            plan = context["cursor"].execute("EXPLAIN QUERY PLAN " + sql.replace("%s", "?"), params).fetchall()
            self.plans.append((sql, [row[-1] for row in plan]))
        return execute(sql, params, many, context)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="PostgreSQL plans by its statistics, not by the schema alone")
def test_the_statements_of_a_task_and_of_housekeeping_read_the_task_table_through_an_index():
    """A statement that scans the task table costs more with every task ever run: none on the hot path may."""
    process_id, _ = dispatch.register_process("plans", 1)
    worker_id = dispatch.register_worker(process_id, "worker.plans", 2).connection_id
    plans = QueryPlans()
    with connection.execute_wrapper(plans):
        (first,) = dispatch.submit_task("client.plans", "app", "m1", "one").assignments
        (second,) = dispatch.submit_task("client.plans", None, "m2", "two", timeout=30).assignments
        dispatch.submit_task("client.plans", None, "m3", "three")
        dispatch.complete_task(worker_id, first.task_id, "ONE")
        dispatch.fail_task(worker_id, second.task_id, "broken")
        with pytest.raises(dispatch.UnknownTask):
            dispatch.complete_task(worker_id, "424242", "nobody asked")
        dispatch.mark_delivered([int(first.task_id)])
        dispatch.housekeep(process_id)
        dispatch.broker_status()
        dispatch.register_client(process_id, "client.again", "app")
        dispatch.release_connection(worker_id)

    assert len(plans.plans) > 10
    scans = [(sql, plan) for sql, plan in plans.plans if any(step.startswith("SCAN broker_task") for step in plan)]
    assert scans == []


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's")
def test_on_postgresql_the_statements_of_a_task_are_prepared_once_per_connection_not_planned_per_batch():
    """The default of ``TURTLEMQ_PG_PREPARE_THRESHOLD``.

    Measured: about a fifth less of PostgreSQL's CPU per W1 round trip (1.1-1.3 ms -> 0.9 ms).
    """
    process_id, _ = dispatch.register_process("prepared", 1)
    worker = dispatch.register_worker(process_id, "worker.prepared", 100)
    held = []
    for n in range(8):  # one batch each, every one handing its task to the worker
        errors, effects = dispatch.run_batch([dispatch.Submit("client.prepared", None, f"m{n}", "x")])
        assert errors == [None]
        held += [assignment.task_id for assignment in effects.assignments]
    for task_id in held:  # one batch each, every one refilling the worker's slot (a claim)
        dispatch.complete_task(worker.connection_id, task_id, "X")
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement for (statement,) in cursor.fetchall()]
    assert any(statement.startswith("INSERT INTO broker_task") for statement in prepared), prepared
    assert any(statement.startswith("SELECT id, channel_name") for statement in prepared), prepared  # free workers
    # "The oldest queued tasks" is planned each time: a generic plan made on an empty table scans the queue.
    assert not any(statement.startswith("SELECT id, data, timeout FROM broker_task") for statement in prepared)
    assert not any(statement.startswith("WITH due AS") for statement in prepared)  # the claim


class PostgresPlans:
    """An execute wrapper that records PostgreSQL's plan of every look-up of the queue before running it."""

    def __init__(self) -> None:
        self.plans: list[tuple[str, str]] = []

    def __call__(self, execute, sql, params, many, context):
        if "ORDER BY id LIMIT" in sql and not sql.startswith("EXPLAIN"):
            cursor = context["cursor"]
            cursor.execute("EXPLAIN " + sql, params)
            self.plans.append((sql, "\n".join(row for (row,) in cursor.fetchall())))
        return execute(sql, params, many, context)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL plans by its statistics")
def test_on_postgresql_the_queue_is_read_through_its_own_index_even_with_statistics_of_a_full_queue():
    """Statistics taken during a burst say that most tasks are queued; the queue look-ups must not believe them.

    With only the (state, id) index, PostgreSQL then walked the primary key
    from the oldest task, past every finished one, for each refill: 0.6 ms
    after 2,400 tasks, growing with the table until the next ANALYZE.
    """
    process_id, _ = dispatch.register_process("stats", 1)
    dispatch.run_batch([dispatch.Submit("client.stats", None, f"m{n}", "x") for n in range(3000)])
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE broker_task")  # as autovacuum might, mid-burst: all 3,000 queued
    oldest_left = Task.objects.order_by("pk").values_list("pk", flat=True)[2990]
    Task.objects.filter(pk__lt=oldest_left).update(state=Task.State.DONE)  # then the burst is worked off

    plans = PostgresPlans()
    with connection.execute_wrapper(plans):
        worker = dispatch.register_worker(process_id, "worker.stats", 4)  # an assignment round: the due tasks
        dispatch.complete_task(worker.connection_id, worker.effects.assignments[0].task_id, "X")  # a refill: a claim

    assert len(plans.plans) == 2, plans.plans
    for sql, plan in plans.plans:
        assert "Index Scan using task_queued_idx" in plan, f"{sql}\n{plan}"
