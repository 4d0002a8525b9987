"""The task state machine of ``broker.dispatch``, called directly against the database.

Channel names here are plain strings: the domain layer only stores and returns
them. The last test hammers the compare-and-set claims from several threads,
each with its own database connection, which matters most on PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from django.db import IntegrityError, OperationalError, connections, transaction
from django.db.models import Count
from django.utils import timezone

from broker import dispatch
from broker.dispatch import Assignment, Outcome, UnknownTask
from broker.models import BrokerProcess, Connection, Task

pytestmark = pytest.mark.django_db

T = TypeVar("T")


def new_process(hostname: str | None = None, pid: int | None = None) -> int:
    """A broker process row; a host of its own unless told, so that nothing else reaps it."""
    process_id, _ = dispatch.register_process(hostname or f"host-{uuid.uuid4().hex[:8]}", pid or os.getpid())
    return process_id


@pytest.fixture
def process_id() -> int:
    return new_process()


def add_worker(process_id: int, name: str, concurrency: int = 1) -> tuple[int, list[Assignment]]:
    registration = dispatch.register_worker(process_id, f"worker.{name}", concurrency)
    return registration.connection_id, registration.effects.assignments


def add_idle_worker(process_id: int, name: str, concurrency: int = 1, idle_for: float = 0.0) -> int:
    """A worker row made without an assignment round, idle for ``idle_for`` seconds."""
    return Connection.objects.create(
        channel_name=f"worker.{name}",
        role=Connection.Role.WORKER,
        process_id=process_id,
        concurrency=concurrency,
        ready_at=timezone.now() - timedelta(seconds=idle_for),
    ).pk


def submit(message_id: str, data: str = "", client_id: str | None = None, **options: Any) -> dispatch.Effects:
    return dispatch.submit_task(f"client.{client_id or 'anon'}", client_id, message_id, data, **options)


def task(message_id: str) -> Task:
    return Task.objects.get(message_id=message_id)


def assign_now(at: Any = None) -> list[Assignment]:
    with transaction.atomic():
        return dispatch._assign(at or timezone.now())


def snapshot() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return list(Task.objects.order_by("pk").values()), list(Connection.objects.order_by("pk").values())


def in_flight(worker_id: int) -> int:
    return Connection.objects.get(pk=worker_id).in_flight


# --- submit and assign ------------------------------------------------------------------------


def test_submitted_task_is_stored_queued_when_no_worker_exists(process_id, settings):
    settings.TURTLEMQ_MAX_ATTEMPTS = 4
    effects = submit("m1", "payload", timeout=2.5)
    assert not effects
    row = task("m1")
    assert (row.state, row.data, row.attempts, row.max_attempts, row.timeout) == ("queued", "payload", 0, 4, 2.5)
    assert row.reply_channel == "client.anon" and row.worker_id is None


def test_submitted_task_goes_to_an_idle_worker_with_a_string_task_id(process_id, settings):
    settings.TURTLEMQ_DEFAULT_LEASE = 0  # no lease
    worker_id, _ = add_worker(process_id, "w")
    effects = submit("m1", "payload")
    row = task("m1")
    assert effects.assignments == [Assignment("worker.w", str(row.pk), "payload")]
    assert (row.state, row.worker_id, row.attempts) == ("assigned", worker_id, 1)
    assert row.assigned_at is not None and row.lease_expires_at is None
    assert in_flight(worker_id) == 1


def test_assignment_sets_the_lease_of_a_task_with_a_timeout(process_id):
    add_worker(process_id, "w")
    before = timezone.now()
    submit("m1", timeout=30)
    lease = task("m1").lease_expires_at
    assert before + timedelta(seconds=30) <= lease <= timezone.now() + timedelta(seconds=30)


def test_registering_a_worker_hands_it_queued_tasks_up_to_its_concurrency(process_id):
    for n in range(5):
        submit(f"m{n}", f"d{n}")
    worker_id, assignments = add_worker(process_id, "w", concurrency=3)
    assert [a.data for a in assignments] == ["d0", "d1", "d2"]
    assert in_flight(worker_id) == 3
    assert Task.objects.queued().count() == 2


def test_assign_never_exceeds_a_workers_concurrency(process_id):
    worker_id, _ = add_worker(process_id, "w", concurrency=2)
    assigned = [a for n in range(4) for a in submit(f"m{n}").assignments]
    assert len(assigned) == 2
    assert assign_now() == []
    assert in_flight(worker_id) == 2
    assert Task.objects.held_by(worker_id).count() == 2
    assert Task.objects.queued().count() == 2


def test_assign_deals_oldest_tasks_to_longest_idle_workers_one_slot_at_a_time(process_id):
    for n in range(4):
        submit(f"m{n}", f"d{n}")
    newest = add_idle_worker(process_id, "newest", idle_for=1)
    oldest = add_idle_worker(process_id, "oldest", concurrency=2, idle_for=30)
    middle = add_idle_worker(process_id, "middle", idle_for=10)
    assignments = assign_now()
    assert [(a.worker_channel, a.data) for a in assignments] == [
        ("worker.oldest", "d0"),
        ("worker.oldest", "d3"),
        ("worker.middle", "d1"),
        ("worker.newest", "d2"),
    ]
    assert [in_flight(w) for w in (oldest, middle, newest)] == [2, 1, 1]


def test_a_finished_worker_is_the_last_choice_for_the_next_task(process_id):
    first, _ = add_worker(process_id, "first")
    add_worker(process_id, "second")
    (assignment,) = submit("m1").assignments
    assert assignment.worker_channel == "worker.first"
    dispatch.complete_task(first, assignment.task_id, "r")
    assert [a.worker_channel for a in submit("m2").assignments] == ["worker.second"]
    assert [a.worker_channel for a in submit("m3").assignments] == ["worker.first"]


def test_disconnected_workers_get_nothing(process_id):
    worker_id, _ = add_worker(process_id, "w")
    dispatch.release_connection(worker_id)
    assert not submit("m1")
    assert task("m1").state == "queued"


# --- release -----------------------------------------------------------------------------------------


def test_released_workers_tasks_go_back_to_the_queue_ahead_of_newer_tasks(process_id):
    leaving, _ = add_worker(process_id, "leaving", concurrency=2)
    submit("old1", "o1")
    submit("old2", "o2")
    submit("new", "n")
    effects = dispatch.release_connection(leaving)
    assert not effects  # nobody left to take them
    assert {t.message_id: (t.state, t.worker_id) for t in Task.objects.all()} == {
        "old1": ("queued", None),
        "old2": ("queued", None),
        "new": ("queued", None),
    }
    released = Connection.objects.get(pk=leaving)
    assert released.disconnected_at is not None and released.in_flight == 0

    _, assignments = add_worker(process_id, "next")
    assert [a.data for a in assignments] == ["o1"]


def test_release_hands_the_tasks_to_idle_workers_at_once(process_id):
    leaving, _ = add_worker(process_id, "leaving")
    submit("m1", "d")
    add_worker(process_id, "idle")
    effects = dispatch.release_connection(leaving)
    assert [(a.worker_channel, a.data) for a in effects.assignments] == [("worker.idle", "d")]
    assert task("m1").attempts == 2


def test_releasing_a_connection_twice_does_nothing_the_second_time(process_id):
    leaving, _ = add_worker(process_id, "leaving")
    submit("m1")
    dispatch.release_connection(leaving)
    add_idle_worker(process_id, "late")
    before = snapshot()
    assert not dispatch.release_connection(leaving)
    assert snapshot() == before


# --- complete, fail, touch ------------------------------------------------------------------------------


def test_complete_task_stores_the_result_frees_the_slot_and_assigns_the_next(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (first,) = submit("m1", "a", client_id="app").assignments
    submit("m2", "b")
    effects = dispatch.complete_task(worker_id, first.task_id, "ra")
    assert effects.outcomes == [Outcome("client.app", int(first.task_id), "m1", True, "ra")]
    assert [a.data for a in effects.assignments] == ["b"]
    row = task("m1")
    assert (row.state, row.result, row.worker_id) == ("done", "ra", worker_id)
    assert row.finished_at is not None and row.delivered_at is None
    assert in_flight(worker_id) == 1


def test_complete_task_by_the_wrong_worker_raises_unknown_task_and_changes_nothing(process_id):
    add_worker(process_id, "holder")
    other, _ = add_worker(process_id, "other")
    (theirs,) = submit("m1", "a").assignments
    (mine,) = submit("m2", "b").assignments
    before = snapshot()
    with pytest.raises(UnknownTask) as caught:
        dispatch.complete_task(other, theirs.task_id, "stolen")
    assert caught.value.code == "UNKNOWN_TASK"
    assert caught.value.held == [(mine.task_id, "b")]
    assert snapshot() == before


def test_complete_task_by_a_worker_holding_nothing_raises_and_changes_nothing(process_id):
    add_worker(process_id, "holder")
    (assignment,) = submit("m1").assignments
    idle, _ = add_worker(process_id, "idle")
    before = snapshot()
    with pytest.raises(UnknownTask) as caught:
        dispatch.complete_task(idle, assignment.task_id, "r")
    assert caught.value.held == []
    assert snapshot() == before


@pytest.mark.parametrize("task_id", ["0", "abc", "", "1e3", "٣", "9" * 30, "-1"])
def test_complete_task_with_a_malformed_or_unknown_id_raises_unknown_task(process_id, task_id):
    worker_id, _ = add_worker(process_id, "w")
    submit("m1")
    before = snapshot()
    with pytest.raises(UnknownTask):
        dispatch.complete_task(worker_id, task_id, "r")
    assert snapshot() == before


def test_completing_a_task_twice_raises_unknown_task_the_second_time(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    dispatch.complete_task(worker_id, assignment.task_id, "first")
    with pytest.raises(UnknownTask):
        dispatch.complete_task(worker_id, assignment.task_id, "second")
    assert task("m1").result == "first"


def test_failed_task_is_queued_again_with_a_doubling_backoff(process_id, settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 10.0
    settings.TURTLEMQ_MAX_ATTEMPTS = 3
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1", "d").assignments

    before = timezone.now()
    effects = dispatch.fail_task(worker_id, assignment.task_id, "boom")
    assert not effects  # not due yet: the free worker gets nothing
    row = task("m1")
    assert (row.state, row.failures, row.last_error, row.worker_id) == ("queued", 1, "boom", None)
    assert before + timedelta(seconds=10) <= row.not_before <= timezone.now() + timedelta(seconds=10)
    assert in_flight(worker_id) == 0

    (again,) = assign_now(row.not_before)
    assert again == assignment
    before = timezone.now()
    dispatch.fail_task(worker_id, assignment.task_id, "boom again")
    row = task("m1")
    assert (row.failures, row.last_error) == (2, "boom again")
    assert before + timedelta(seconds=20) <= row.not_before <= timezone.now() + timedelta(seconds=20)


def test_failed_task_is_not_dispatched_before_its_backoff_passed(process_id, settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 10.0
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    dispatch.fail_task(worker_id, assignment.task_id, "boom")
    not_before = task("m1").not_before
    assert assign_now(not_before - timedelta(milliseconds=1)) == []
    assert [a.task_id for a in assign_now(not_before)] == [assignment.task_id]


def test_a_task_waiting_for_its_retry_does_not_hold_up_the_queue(process_id, settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 10.0
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    submit("m2", "next")
    effects = dispatch.fail_task(worker_id, assignment.task_id, "boom")
    assert [a.data for a in effects.assignments] == ["next"]


def test_task_fails_for_good_after_its_attempt_limit(process_id, settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 0.0
    settings.TURTLEMQ_MAX_ATTEMPTS = 2
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1", client_id="app").assignments
    effects = dispatch.fail_task(worker_id, assignment.task_id, "first")
    assert effects.outcomes == [] and [a.task_id for a in effects.assignments] == [assignment.task_id]
    effects = dispatch.fail_task(worker_id, assignment.task_id, "last")
    assert effects.outcomes == [Outcome("client.app", int(assignment.task_id), "m1", False, "last")]
    assert effects.assignments == []
    row = task("m1")
    assert (row.state, row.failures, row.attempts, row.result) == ("failed", 2, 2, "last")
    assert in_flight(worker_id) == 0


def test_max_attempts_of_a_task_overrides_the_setting(process_id, settings):
    settings.TURTLEMQ_MAX_ATTEMPTS = 5
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1", max_attempts=1).assignments
    assert len(dispatch.fail_task(worker_id, assignment.task_id, "once").outcomes) == 1
    assert task("m1").state == "failed"


def test_fail_task_by_the_wrong_worker_raises_unknown_task_and_changes_nothing(process_id):
    add_worker(process_id, "holder")
    other, _ = add_worker(process_id, "other")
    (assignment,) = submit("m1").assignments
    before = snapshot()
    with pytest.raises(UnknownTask):
        dispatch.fail_task(other, assignment.task_id, "boom")
    assert snapshot() == before


def test_touch_task_renews_the_lease(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1", timeout=60).assignments
    Task.objects.filter(pk=int(assignment.task_id)).update(lease_expires_at=timezone.now())
    before = timezone.now()
    dispatch.touch_task(worker_id, assignment.task_id)
    assert task("m1").lease_expires_at >= before + timedelta(seconds=60)


def test_touch_task_without_a_timeout_or_default_lease_changes_nothing(process_id, settings):
    settings.TURTLEMQ_DEFAULT_LEASE = 0
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    before = snapshot()
    dispatch.touch_task(worker_id, assignment.task_id)
    assert snapshot() == before


def test_touch_task_by_the_wrong_worker_raises_unknown_task(process_id):
    add_worker(process_id, "holder")
    other, _ = add_worker(process_id, "other")
    (assignment,) = submit("m1", timeout=60).assignments
    with pytest.raises(UnknownTask):
        dispatch.touch_task(other, assignment.task_id)


# --- leases ----------------------------------------------------------------------------------------------


def test_expired_lease_takes_the_task_back_and_gives_it_to_another_worker(process_id, settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 0.0
    silent, _ = add_worker(process_id, "silent")
    (assignment,) = submit("m1", "d", timeout=5).assignments
    add_worker(process_id, "other")

    assert not dispatch.expire_leases(timezone.now())  # not yet
    effects = dispatch.expire_leases(timezone.now() + timedelta(seconds=6))
    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.other", assignment.task_id)]
    row = task("m1")
    assert (row.failures, row.last_error, row.attempts) == (1, "lease expired", 2)
    assert in_flight(silent) == 0
    with pytest.raises(UnknownTask):
        dispatch.complete_task(silent, assignment.task_id, "late")


def test_expired_lease_on_the_last_attempt_fails_the_task(process_id):
    add_worker(process_id, "silent")
    (assignment,) = submit("m1", client_id="app", timeout=1, max_attempts=1).assignments
    effects = dispatch.expire_leases(timezone.now() + timedelta(seconds=2))
    assert effects.outcomes == [Outcome("client.app", int(assignment.task_id), "m1", False, "lease expired")]
    assert task("m1").state == "failed"


# --- clients: resume and idempotency ----------------------------------------------------------------------


def test_repeated_message_id_of_a_task_in_flight_creates_nothing(process_id):
    submit("m1", "a", client_id="app")
    before = snapshot()
    assert not submit("m1", "a", client_id="app")
    assert snapshot() == before


def test_repeated_message_id_of_a_finished_task_replays_its_outcome(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1", "a", client_id="app").assignments
    dispatch.complete_task(worker_id, assignment.task_id, "stored")
    effects = dispatch.submit_task("client.new", "app", "m1", "a")
    assert effects.outcomes == [Outcome("client.new", int(assignment.task_id), "m1", True, "stored")]
    assert effects.assignments == []
    assert Task.objects.count() == 1


def test_message_ids_are_not_deduplicated_without_a_client_id(process_id):
    submit("m1")
    submit("m1")
    assert Task.objects.filter(message_id="m1").count() == 2


def test_message_ids_are_deduplicated_per_client_id(process_id):
    submit("m1", client_id="one")
    submit("m1", client_id="two")
    assert Task.objects.filter(message_id="m1").count() == 2


def test_resuming_client_gets_undelivered_outcomes_and_its_unfinished_tasks(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (done,) = submit("done", "a", client_id="app").assignments
    dispatch.complete_task(worker_id, done.task_id, "ra")
    submit("waiting", "b", client_id="app")
    submit("foreign", "c", client_id="someone-else")

    registration = dispatch.register_client(process_id, "client.back", "app")
    assert registration.effects.outcomes == [Outcome("client.back", int(done.task_id), "done", True, "ra")]
    assert task("waiting").reply_channel == "client.back"
    assert task("foreign").reply_channel == "client.someone-else"

    dispatch.mark_delivered([int(done.task_id)])
    assert task("done").delivered_at is not None
    assert not dispatch.register_client(process_id, "client.again", "app").effects


def test_anonymous_client_registration_sends_nothing(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    dispatch.complete_task(worker_id, assignment.task_id, "r")
    assert not dispatch.register_client(process_id, "client.new", None).effects


# --- status ---------------------------------------------------------------------------------------------


def test_broker_status_counts_workers_clients_and_tasks(process_id):
    gone, _ = add_worker(process_id, "gone")
    dispatch.release_connection(gone)
    dispatch.register_client(process_id, "client.a", None)
    add_worker(process_id, "busy", concurrency=2)
    add_worker(process_id, "busy-too")
    for n in range(4):
        submit(f"m{n}")  # busy holds two, busy-too one, one waits
    add_idle_worker(process_id, "idle")
    assert dispatch.broker_status() == {
        "idleWorkers": 1,
        "busyWorkers": 2,
        "clients": 1,
        "queuedTasks": 1,
        "runningTasks": 3,
    }


# --- operator actions -------------------------------------------------------------------------------------


def test_cancel_tasks_ends_queued_and_assigned_tasks_and_frees_the_worker(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (held,) = submit("held", client_id="app").assignments
    submit("queued", client_id="app")
    submit("next", client_id="app")
    effects = dispatch.cancel_tasks([int(held.task_id), task("queued").pk], reason="stop")
    assert {(o.message_id, o.ok, o.data) for o in effects.outcomes} == {
        ("held", False, "stop"),
        ("queued", False, "stop"),
    }
    assert [a.data for a in effects.assignments] == [task("next").data]
    assert task("held").state == task("queued").state == "cancelled"
    assert task("next").state == "assigned" and in_flight(worker_id) == 1
    with pytest.raises(UnknownTask):
        dispatch.complete_task(worker_id, held.task_id, "late")


def test_cancel_tasks_leaves_finished_tasks_alone(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    dispatch.complete_task(worker_id, assignment.task_id, "r")
    before = snapshot()
    assert not dispatch.cancel_tasks([int(assignment.task_id)])
    assert snapshot() == before


def test_requeue_tasks_restarts_failed_and_cancelled_tasks_with_fresh_attempts(process_id, settings):
    settings.TURTLEMQ_MAX_ATTEMPTS = 1
    worker_id, _ = add_worker(process_id, "w")
    (failed,) = submit("failed").assignments
    dispatch.fail_task(worker_id, failed.task_id, "boom")
    submit("cancelled")
    dispatch.cancel_tasks([task("cancelled").pk])
    dispatch.mark_delivered([task("failed").pk, task("cancelled").pk])

    count, effects = dispatch.requeue_tasks([task("failed").pk, task("cancelled").pk])
    assert count == 2
    assert [a.task_id for a in effects.assignments] == [failed.task_id]
    for message_id, state in (("failed", "assigned"), ("cancelled", "queued")):
        row = task(message_id)
        assert (row.state, row.failures, row.result, row.finished_at, row.delivered_at) == (state, 0, None, None, None)


def test_requeue_tasks_takes_an_assigned_task_from_its_worker(process_id):
    holder, _ = add_worker(process_id, "holder")
    (assignment,) = submit("m1").assignments
    count, effects = dispatch.requeue_tasks([int(assignment.task_id)])
    assert count == 1
    # The holder is free again and is the only worker: it gets the task anew.
    assert [a.worker_channel for a in effects.assignments] == ["worker.holder"]
    assert task("m1").attempts == 2
    assert in_flight(holder) == 1


def test_requeue_tasks_leaves_queued_and_done_tasks_alone(process_id):
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("done").assignments
    dispatch.complete_task(worker_id, assignment.task_id, "r")
    dispatch.release_connection(worker_id)
    submit("queued")
    before = snapshot()
    count, effects = dispatch.requeue_tasks([task("done").pk, task("queued").pk])
    assert (count, effects) == (0, dispatch.Effects())
    assert snapshot() == before


def test_requeue_orphans_takes_back_tasks_of_connections_that_are_gone(process_id):
    vanished, _ = add_worker(process_id, "vanished")
    (assignment,) = submit("m1").assignments
    # The connection row says it closed, but its tasks were never released (a crash half way).
    Connection.objects.filter(pk=vanished).update(disconnected_at=timezone.now())
    add_worker(process_id, "idle")
    count, effects = dispatch.requeue_orphans()
    assert count == 1
    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.idle", assignment.task_id)]


def test_purge_finished_tasks_deletes_only_old_finished_tasks(process_id):
    worker_id, _ = add_worker(process_id, "w", concurrency=5)
    for name in ("old-done", "new-done", "old-failed", "running"):
        submit(name, max_attempts=1)
    for name in ("old-done", "new-done"):
        dispatch.complete_task(worker_id, str(task(name).pk), "r")
    dispatch.fail_task(worker_id, str(task("old-failed").pk), "x")
    submit("old-cancelled")
    dispatch.cancel_tasks([task("old-cancelled").pk])
    submit("queued")
    long_ago = timezone.now() - timedelta(days=10)
    Task.objects.filter(message_id__startswith="old-").update(finished_at=long_ago, created_at=long_ago)

    assert dispatch.purge_finished_tasks(timedelta(days=1)) == 3
    assert sorted(Task.objects.values_list("message_id", flat=True)) == ["new-done", "queued", "running"]


def test_purge_finished_tasks_deletes_long_closed_connections_and_stopped_processes(process_id):
    other_process = new_process()
    gone, _ = add_worker(other_process, "gone")
    dispatch.stop_process(other_process)
    live, _ = add_worker(process_id, "live")
    long_ago = timezone.now() - timedelta(days=10)
    Connection.objects.filter(pk=gone).update(disconnected_at=long_ago)
    BrokerProcess.objects.filter(pk=other_process).update(stopped_at=long_ago)

    dispatch.purge_finished_tasks(timedelta(days=1))
    assert list(Connection.objects.values_list("pk", flat=True)) == [live]
    assert list(BrokerProcess.objects.values_list("pk", flat=True)) == [process_id]


# --- broker processes --------------------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_register_process_reaps_a_dead_pid_on_the_same_host(process_id):
    dead = new_process("shared-host", dead_pid())
    holder, _ = add_worker(dead, "holder")
    (assignment,) = submit("m1").assignments
    add_worker(process_id, "survivor")

    me, effects = dispatch.register_process("shared-host", os.getpid())
    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.survivor", assignment.task_id)]
    assert BrokerProcess.objects.get(pk=dead).stopped_at is not None
    assert Connection.objects.get(pk=holder).disconnected_at is not None
    assert BrokerProcess.objects.get(pk=me).stopped_at is None


def test_register_process_reaps_an_earlier_process_with_its_own_pid(process_id):
    # The pid was reused: the earlier process of that pid on this host is dead.
    earlier = new_process("reused-host", os.getpid())
    dispatch.register_process("reused-host", os.getpid())
    assert BrokerProcess.objects.get(pk=earlier).stopped_at is not None


def test_register_process_spares_live_pids_and_other_hosts(process_id):
    alive = new_process("shared-host", os.getppid())
    elsewhere = new_process("other-host", dead_pid())
    dispatch.register_process("shared-host", os.getpid())
    assert BrokerProcess.objects.filter(pk__in=[alive, elsewhere], stopped_at__isnull=True).count() == 2


def test_housekeep_reaps_a_process_whose_heartbeat_is_stale(process_id, settings):
    settings.TURTLEMQ_PROCESS_DEAD_AFTER = 15
    stale = new_process()
    holder, _ = add_worker(stale, "holder")
    (assignment,) = submit("m1").assignments
    add_worker(process_id, "survivor")
    fresh = new_process()
    BrokerProcess.objects.filter(pk=stale).update(heartbeat_at=timezone.now() - timedelta(seconds=16))
    BrokerProcess.objects.filter(pk=process_id).update(heartbeat_at=timezone.now() - timedelta(seconds=10))

    effects = dispatch.housekeep(process_id)
    assert [(a.worker_channel, a.task_id) for a in effects.assignments] == [("worker.survivor", assignment.task_id)]
    assert BrokerProcess.objects.get(pk=stale).stopped_at is not None
    assert Connection.objects.get(pk=holder).disconnected_at is not None
    assert BrokerProcess.objects.filter(pk__in=[process_id, fresh], stopped_at__isnull=True).count() == 2
    # Housekeeping beat this process's own heartbeat.
    assert BrokerProcess.objects.get(pk=process_id).heartbeat_at > timezone.now() - timedelta(seconds=5)


def test_housekeep_dispatches_retries_whose_backoff_passed(process_id, settings):
    settings.TURTLEMQ_RETRY_BACKOFF = 10.0
    worker_id, _ = add_worker(process_id, "w")
    (assignment,) = submit("m1").assignments
    dispatch.fail_task(worker_id, assignment.task_id, "boom")
    assert not dispatch.housekeep(process_id)
    Task.objects.filter(pk=int(assignment.task_id)).update(not_before=timezone.now() - timedelta(seconds=1))
    assert [a.task_id for a in dispatch.housekeep(process_id).assignments] == [assignment.task_id]


def test_stop_process_releases_what_its_connections_hold(process_id):
    other = new_process()
    holder, _ = add_worker(other, "holder")
    submit("m1")
    dispatch.stop_process(other)
    assert task("m1").state == "queued"
    assert Connection.objects.get(pk=holder).disconnected_at is not None
    assert not dispatch.stop_process(other)  # a second stop finds nothing to do


# --- many threads at once ----------------------------------------------------------------------------------


def retrying(deadline: float, call: Callable[[], T]) -> T:
    """Run one domain call (one transaction) from a thread, retrying while SQLite's test database is locked.

    SQLite's in-memory test database is shared between threads with table
    locks, which fail at once instead of waiting. A failed try changed
    nothing, so trying again is safe. (Real SQLite is a WAL file with a busy
    timeout; PostgreSQL waits for row locks.)
    """
    while True:
        try:
            return call()
        except OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.001)


def run_in_threads(bodies: list[Callable[[], None]], deadline: float) -> list[BaseException]:
    """Run each body in its own thread with its own database connection; return what they raised."""
    errors: list[BaseException] = []

    def run(body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    assert not any(thread.is_alive() for thread in threads), "threads did not finish in time"
    return errors


@pytest.mark.django_db(transaction=True)
def test_one_client_id_submitting_one_message_id_from_many_threads_at_once_creates_one_task():
    process_id = new_process()
    deadline = time.monotonic() + 60
    start = threading.Barrier(6)
    results: list[dispatch.Effects] = []

    def submit_once(n: int) -> None:
        start.wait(timeout=30)
        results.append(retrying(deadline, lambda: dispatch.submit_task(f"client.{n}", "app", "m1", "payload")))

    retrying(deadline, lambda: dispatch.register_worker(process_id, "worker.w", 6))
    errors = run_in_threads([lambda n=n: submit_once(n) for n in range(6)], deadline)
    assert errors == []
    assert Task.objects.count() == 1
    assert sum(len(effects.assignments) for effects in results) == 1


def test_submit_does_not_mistake_another_integrity_error_for_a_repeat(process_id, monkeypatch):
    def broken_assign(now, statements=None):
        raise IntegrityError("some other constraint")

    monkeypatch.setattr(dispatch, "_assign", broken_assign)
    with pytest.raises(IntegrityError):
        submit("m1", client_id="app")
    assert Task.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_submits_completions_and_registrations_never_assign_a_task_twice_or_overfill_a_worker():
    """Submitters, workers and late-registering workers race on one database, each thread with its own connection."""
    process_id = new_process()
    tasks_per_submitter, submitters = 15, 3
    total = tasks_per_submitter * submitters
    assignments: list[Assignment] = []
    overfilled: list[Any] = []
    lock = threading.Lock()
    all_done = threading.Event()
    halfway = threading.Event()
    deadline = time.monotonic() + 60  # well inside the test timeout, even on a loaded machine

    def record(effects: dispatch.Effects) -> None:
        with lock:
            assignments.extend(effects.assignments)

    def stopping_all_on_error(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException:
                all_done.set()  # the others stop; run_in_threads reports the error
                raise

        return run

    def submitter(n: int) -> None:
        for i in range(tasks_per_submitter):
            record(retrying(deadline, lambda i=i: dispatch.submit_task(f"client.{n}", f"c{n}", f"m{i}", f"{n}:{i}")))
            if i == tasks_per_submitter // 2:
                halfway.set()

    def worker(name: str, concurrency: int, late: bool = False) -> None:
        if late:
            halfway.wait(timeout=30)
        registration = retrying(deadline, lambda: dispatch.register_worker(process_id, f"worker.{name}", concurrency))
        record(registration.effects)
        me = registration.connection_id
        while not all_done.is_set() and time.monotonic() < deadline:
            held = retrying(deadline, lambda: list(Task.objects.held_by(me).values_list("pk", flat=True)))
            for pk in held:
                record(retrying(deadline, lambda pk=pk: dispatch.complete_task(me, str(pk), f"done by {name}")))
            if not held:
                time.sleep(0.002)  # pacing, not synchronisation: spare the two cores
            if retrying(deadline, Task.objects.finished().count) == total:
                all_done.set()

    def monitor() -> None:
        holders = (
            Task.objects.assigned()
            .values("worker_id", "worker__concurrency")
            .annotate(n=Count("pk"))
            .values_list("worker_id", "n", "worker__concurrency")
        )
        while not all_done.is_set() and time.monotonic() < deadline:
            for worker_id, held, concurrency in retrying(deadline, lambda: list(holders.all())):
                if held > concurrency:
                    overfilled.append((worker_id, held, concurrency))
            time.sleep(0.002)

    bodies = [lambda n=n: submitter(n) for n in range(submitters)]
    workers = (("a", 1, False), ("b", 2, False), ("c", 3, False), ("late", 2, True))
    bodies += [lambda args=args: worker(*args) for args in workers]
    bodies.append(monitor)
    errors = run_in_threads([stopping_all_on_error(body) for body in bodies], deadline)
    assert errors == []

    assert overfilled == []
    rows = list(Task.objects.values_list("state", "attempts", "worker__channel_name", "result"))
    assert len(rows) == total
    assert all(state == "done" and attempts == 1 for state, attempts, _, _ in rows)
    assert all(result == f"done by {channel.removeprefix('worker.')}" for _, _, channel, result in rows)
    # Every task was handed out exactly once, to the worker that completed it.
    assigned_ids = [a.task_id for a in assignments]
    assert len(assigned_ids) == len(set(assigned_ids)) == total
    assert Connection.objects.filter(in_flight__gt=0).count() == 0
