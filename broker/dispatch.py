"""Task dispatch: the task state machine and every change made to it.

States of ``Task.state`` and who moves a task between them::

    submit_task ─> QUEUED ──assign──> ASSIGNED ──complete_task──> DONE
                    ^  ^                 │  │
                    │  └─ fail_task, ────┘  └─ fail_task / lease expiry,
                    │    attempts left          no attempts left ──────> FAILED
                    │    (after backoff)
                    └─ release: the worker disconnected, its broker process
                       died, or an operator requeued it

    QUEUED | ASSIGNED ── cancel_tasks (operator) ──> CANCELLED
    FAILED | CANCELLED ── requeue_tasks (operator) ──> QUEUED

* ``assign`` hands the oldest due QUEUED tasks (by id, so a released task goes
  back ahead of everything submitted after it) to the live workers with a free
  slot, longest idle first. It is a compare-and-set on both rows: a worker's
  ``in_flight`` never exceeds its ``concurrency`` and a task is ASSIGNED to one
  worker at most, even with several broker processes on one PostgreSQL (which
  also skips rows another process has locked).
* ``delivered_at`` records that the outcome of a finished task (DONE, FAILED,
  CANCELLED) was sent to its client; a client that resumes with its
  ``clientId`` is sent every finished task that lacks it.
* An ASSIGNED task carries a lease (``REQUEST_TASK.timeout``, else
  ``TURTLEMQ_DEFAULT_LEASE``; 0 means none) that TOUCH_TASK renews; housekeeping
  takes back a task held past it, as a failed attempt.

Broker processes (``BrokerProcess``): each beats a heartbeat in ``housekeep``.
One silent for longer than ``TURTLEMQ_PROCESS_DEAD_AFTER`` is reaped by the
others (stopped, its connections released, their tasks back in the queue); one
that stops cleanly does the same for itself in ``stop_process``. A process that
was reaped while it was in fact alive (paused, or cut off from the database)
learns it from its next heartbeat (:class:`ProcessStopped`): it must close the
connections it still serves and register afresh. As a safety net against
races, housekeeping also requeues tasks still held by closed connections and
releases connections still open on stopped processes.

Every public function here is synchronous and runs its changes in
transactions. The task frames of connections become :class:`Operation` s
(:class:`Submit`, :class:`Complete`, :class:`Fail`, :class:`Touch`,
:class:`MarkDelivered`, :class:`Release`) that :func:`run_batch` runs many at
a time, in one transaction (``broker.commits`` collects them from all
connections of a process); the functions named after each step
(``submit_task``, ...) run one operation alone, for tools and tests. A batch
of operations that need no answer from the database to know what to write
(submissions without a ``clientId``, completions, delivery marks) can also be
written out whole (:class:`BatchScript`), for ``broker.pgloop`` to send to
PostgreSQL in one round trip, with the same outcome. Everything
returns :class:`Effects`: the frames to announce over the channel layer
*after* the commit. The database is the truth, the layer a doorbell. The
statements every task runs are hand-written SQL (``broker.sql``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, OperationalError, connections, transaction
from django.db.models import Count, Q
from django.utils import timezone

from . import sql
from .models import BrokerProcess, Connection, Task
from .protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from .embedded import LoopConnection
    from .postgres import PipelinedConnection

logger = logging.getLogger("turtlemq.broker")

# How many workers one assignment round considers; each completion, release
# and housekeeping tick runs another round, so this only bounds one statement.
WORKERS_PER_ROUND = 200

# A batch whose connection to PostgreSQL broke may have committed all the same
# (see _settle_lost, and broker.pgloop for the event loop's batches): seconds to
# wait for the lost connection's server process to end, looks for what the
# batch wrote, and seconds between two (a cut that ends every connection of the
# moment, as a restart or a failover does, may take the first new one too).
LOST_PROCESS_TIMEOUT = 5.0
SETTLE_ATTEMPTS = 3
SETTLE_RETRY_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Assignment:
    """A task to be sent to a worker as REQUEST_TASK."""

    worker_channel: str
    task_id: str
    data: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final word on a task, to be sent to its client (RESPONSE_TASK or TASK_FAILED)."""

    reply_channel: str
    task_id: int
    message_id: str
    ok: bool
    data: str


@dataclass(slots=True)
class Effects:
    """What the caller announces after the transaction committed."""

    assignments: list[Assignment] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def __iadd__(self, other: Effects) -> Effects:
        self.assignments.extend(other.assignments)
        self.outcomes.extend(other.outcomes)
        return self

    def __bool__(self) -> bool:
        return bool(self.assignments or self.outcomes)


class UnknownTask(ProtocolError):
    """A worker named a task it does not hold; ``held`` are (taskId, data) of those it does hold."""

    def __init__(self, task_id: str, held: list[tuple[str, str]]) -> None:
        if held:
            message = f"task {task_id[:64]!r} is not assigned to this worker; its assigned task is sent again"
        else:
            message = f"task {task_id[:64]!r} is not assigned to this worker, which holds no task"
        super().__init__(ErrorCode.UNKNOWN_TASK, message)
        self.held = held


class ProcessStopped(Exception):
    """This broker process's row says it stopped: the others declared it dead while it was alive."""

    def __init__(self, process_id: int) -> None:
        super().__init__(f"broker process #{process_id} was declared dead")
        self.process_id = process_id


class InFlightLimit(ProtocolError):
    """A client at its limit of unfinished tasks submitted another one (``TURTLEMQ_MAX_CLIENT_IN_FLIGHT``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorCode.RATE_LIMITED,
            f"this client already has {limit} unfinished tasks, the most allowed; wait for results before submitting",
        )


@dataclass(frozen=True, slots=True)
class Registration:
    """A newly registered connection and what it must be sent right away."""

    connection_id: int
    effects: Effects


# --- broker processes ----------------------------------------------------------


def register_process(hostname: str, pid: int) -> tuple[int, Effects]:
    """Record this broker process; take back what dead processes on this host held.

    A process of this host whose pid no longer runs (or is ours, reused) died
    without cleaning up: its connections are released at once instead of
    after the heartbeat timeout.
    """
    now = timezone.now()
    process = BrokerProcess.objects.create(hostname=hostname, pid=pid, heartbeat_at=now)
    dead = [
        other.pk
        for other in BrokerProcess.objects.running().filter(hostname=hostname).exclude(pk=process.pk)
        if other.pid == pid or not _pid_alive(other.pid)
    ]
    return process.pk, _reap_processes(dead, now)


def housekeep(process_id: int) -> Effects:
    """Periodic work of every broker process: heartbeat, dead processes, leases, orphans, due retries.

    Raises :class:`ProcessStopped` (changing nothing) when this process was
    declared dead meanwhile.
    """
    now = timezone.now()
    if not BrokerProcess.objects.running().filter(pk=process_id).update(heartbeat_at=now):
        raise ProcessStopped(process_id)
    cutoff = now - timedelta(seconds=settings.TURTLEMQ_PROCESS_DEAD_AFTER)
    silent = list(BrokerProcess.objects.silent_since(cutoff).values_list("pk", flat=True))
    effects = _reap_processes(silent, now)
    effects += expire_leases(now)
    # Orphans come only from races, so first two cheap reads that almost always find none.
    if Task.objects.orphaned().exists() or Connection.objects.live().filter(process__stopped_at__isnull=False).exists():
        with transaction.atomic():
            count = _requeue_orphans(now)
        if count:
            logger.warning("%s orphaned tasks went back to the queue", count)
    with transaction.atomic():
        effects.assignments.extend(_assign(now))
    return effects


def stop_process(process_id: int) -> Effects:
    """This process stops serving: mark it stopped (if the others have not) and release its connections.

    Called on a clean shutdown, and by a process that learnt it was declared
    dead, for the connections it registered after the others reaped it.
    """
    now = timezone.now()
    with transaction.atomic():
        BrokerProcess.objects.running().filter(pk=process_id).update(stopped_at=now)
        connection_ids = list(Connection.objects.held_by_processes([process_id]).values_list("pk", flat=True))
        if not _release(connection_ids, now):
            return Effects()
        return Effects(assignments=_assign(now))


def channels_to_close(process_id: int) -> list[str]:
    """Channel names of the connections a stopped process must close: those released when it stopped.

    Also any still open (registered after the process was stopped). Their
    peers must reconnect, since the broker no longer counts them as connected.
    """
    stopped_at = BrokerProcess.objects.filter(pk=process_id).values_list("stopped_at", flat=True).first()
    released = Q(disconnected_at__isnull=True)
    if stopped_at is not None:
        released |= Q(disconnected_at__gte=stopped_at)
    return list(Connection.objects.filter(released, process_id=process_id).values_list("channel_name", flat=True))


def _reap_processes(process_ids: list[int], now: datetime) -> Effects:
    """Declare processes dead, release their connections, and re-send what they may not have announced."""
    effects = Effects()
    for process_id in process_ids:
        with transaction.atomic():
            last_heartbeat = BrokerProcess.objects.filter(pk=process_id).values_list("heartbeat_at", flat=True).first()
            # Compare-and-set: of several live processes, one reaps a dead one.
            if not BrokerProcess.objects.filter(pk=process_id, stopped_at__isnull=True).update(stopped_at=now):
                continue
            connection_ids = list(Connection.objects.held_by_processes([process_id]).values_list("pk", flat=True))
            _release(connection_ids, now)
            effects.assignments.extend(_assign(now))
            effects += _unannounced(last_heartbeat or now, now)
    return effects


def _unannounced(last_heartbeat: datetime, now: datetime) -> Effects:
    """What a process that died at about ``last_heartbeat`` may have committed but never announced.

    A process announces its effects right after each commit; one that dies in
    between leaves a result that a connected client never hears of (until it
    reconnects) and a task that a worker elsewhere holds without knowing.
    So: every outcome whose delivery to a live client connection is not
    recorded, and a reminder (as in rule 4) of every task handed out around the
    time of death. A peer sees one of them twice only if the first was on its
    way at the time (``turtlemq_client`` ignores such repeats).
    """
    live_clients = Connection.objects.live().clients().values("channel_name")
    outcomes = [
        _outcome(reply_channel, pk, message_id, state, result)
        for reply_channel, pk, message_id, state, result in Task.objects.finished()
        .filter(delivered_at__isnull=True, reply_channel__in=live_clients)
        .values_list("reply_channel", "pk", "message_id", "state", "result")
    ]
    # It died before its next heartbeat; give the clocks and a busy event loop some slack.
    margin = timedelta(seconds=max(2 * settings.TURTLEMQ_TICK, 2.0))
    since = last_heartbeat - margin
    until = min(last_heartbeat + timedelta(seconds=settings.TURTLEMQ_TICK) + margin, now)  # not this reaping's
    reminders = [
        Assignment(worker_channel, str(pk), data)
        for pk, data, worker_channel in Task.objects.assigned()
        .filter(assigned_at__gte=since, assigned_at__lt=until, worker__disconnected_at__isnull=True)
        .values_list("pk", "data", "worker__channel_name")
    ]
    return Effects(assignments=reminders, outcomes=outcomes)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_host() -> str:
    return socket.gethostname()


# --- registration and disconnection ----------------------------------------------


def register_client(process_id: int, channel_name: str, client_id: str | None, remote_addr: str = "") -> Registration:
    """Record a client connection; with a ``clientId``, route its results here.

    The returned effects hold the outcome of every task of that ``clientId``
    that finished while it was away.
    """
    now = timezone.now()
    effects = Effects()
    with transaction.atomic():
        connection = Connection.objects.create(
            channel_name=channel_name,
            role=Connection.Role.CLIENT,
            process_id=process_id,
            client_id=client_id,
            remote_addr=remote_addr,
            ready_at=now,
        )
        if client_id is not None:
            mine = Task.objects.filter(client_id=client_id)
            mine.filter(Q(state__in=Task.UNFINISHED_STATES) | Q(delivered_at__isnull=True)).update(
                reply_channel=channel_name
            )
            effects.outcomes.extend(
                _outcome(channel_name, pk, message_id, state, result)
                for pk, message_id, state, result in mine.undelivered_results_for(client_id).values_list(
                    "pk", "message_id", "state", "result"
                )
            )
    return Registration(connection.pk, effects)


def register_worker(process_id: int, channel_name: str, concurrency: int, remote_addr: str = "") -> Registration:
    """Record a worker connection and hand it queued tasks up to its concurrency."""
    now = timezone.now()
    with transaction.atomic():
        connection = Connection.objects.create(
            channel_name=channel_name,
            role=Connection.Role.WORKER,
            process_id=process_id,
            concurrency=concurrency,
            remote_addr=remote_addr,
            ready_at=now,
        )
        assignments = _assign(now)
    return Registration(connection.pk, Effects(assignments=assignments))


def release_connection(connection_id: int) -> Effects:
    """A connection closed: a worker's tasks go back to the queue and on to idle workers."""
    return run_one(Release(connection_id))


def _release(connection_ids: list[int], now: datetime) -> int:
    """Mark connections gone and put the tasks their workers held back in the queue."""
    closed = Connection.objects.live().filter(pk__in=connection_ids).update(disconnected_at=now, in_flight=0)
    if closed:
        Task.objects.assigned().filter(worker_id__in=connection_ids).update(
            state=Task.State.QUEUED, worker=None, lease_expires_at=None
        )
    return closed


# --- batches: the operations of many connections in one transaction -----------------


class Batch:
    """The operations run in one transaction, and what they add up to.

    Operations run in order, each seeing the changes of those before it. Two
    kinds are gathered rather than run one by one, since nothing but the end
    of the batch looks at what they write: new tasks without a ``clientId``
    (one INSERT for all of them) and completions (one UPDATE): they are
    written (:meth:`flush`) before any other kind of operation runs, and at
    the end. What is better done once for all operations then waits for
    :meth:`finish`: one assignment round if tasks or workers became available,
    then the slots that completions and failures freed are refilled from the
    queue (one statement) or given back, and the outcomes sent are marked
    delivered (one statement).
    """

    def __init__(self, now: datetime, statements: sql.Statements) -> None:
        self.now = now
        self.sql = statements  # made inside the batch's transaction
        self.effects = Effects()
        self.freed: dict[int, tuple[str, int]] = {}  # worker id -> (its channel, slots freed in this batch)
        self.delivered: list[int] = []
        self.assign_round = False
        self.position = 0  # of the operation being applied, in the batch
        self.errors: dict[int, ProtocolError] = {}  # by position: operations refused after they were gathered
        self._inserts: list[Submit] = []
        self._completions: list[tuple[int, Complete]] = []

    def free_slot(self, worker_id: int, worker_channel: str) -> None:
        _, count = self.freed.get(worker_id, (worker_channel, 0))
        self.freed[worker_id] = (worker_channel, count + 1)

    def gather_insert(self, submit: Submit) -> None:
        self._inserts.append(submit)

    def gather_completion(self, complete: Complete) -> None:
        self._completions.append((self.position, complete))

    def flush(self) -> None:
        """Write the gathered inserts and completions (before an operation that might see them)."""
        if self._inserts:
            inserts, self._inserts = self._inserts, []
            self.sql.insert_tasks([submit.row() for submit in inserts], self.now)
        if self._completions:
            self._complete()

    def _complete(self) -> None:
        """Complete the gathered tasks in one statement; refuse those the worker did not hold (in order)."""
        gathered, self._completions = self._completions, []
        first: dict[tuple[int, int], tuple[int, Complete]] = {}  # (task, worker) -> its first completion here
        for position, complete in gathered:
            key = _completion_key(complete)
            if key is not None:
                first.setdefault(key, (position, complete))
        completions = [(task_id, worker_id, complete.result) for (task_id, worker_id), (_, complete) in first.items()]
        done = self.sql.complete_held_many(completions, self.now)  # no statement for none
        for position, complete in gathered:
            key = _completion_key(complete)
            if key is None or first[key][0] != position or key not in done:
                # What it holds once this batch's completions are written: the task to send again (rule 4).
                held = [(str(pk), data) for pk, data in self.sql.held(complete.worker_id)]
                self.errors[position] = UnknownTask(complete.task_id, held)
                continue
            reply_channel, message_id = done[key]
            self.effects.outcomes.append(Outcome(reply_channel, key[0], message_id, True, complete.result))
            self.free_slot(complete.worker_id, complete.worker_channel)

    def finish(self) -> None:
        self.flush()
        # Idle workers first: they have waited longer than those that freed a slot just now.
        if self.assign_round:
            self.effects.assignments.extend(_assign(self.now, self.sql))
        if self.freed:
            self._refill()
        if self.delivered:
            self.sql.mark_delivered(self.delivered, self.now)

    def _refill(self) -> None:
        """Hand the workers that freed slots the oldest due tasks; give back the slots left over.

        Any due task left after the batch's assignment round would have gone to
        a worker idle for longer, had there been one, so the workers that free
        up are the right ones to take them, and their slots stay taken, which
        saves updating their rows. One statement deals the oldest tasks out
        to them in the order they freed up.
        """
        slots = [(worker_id, count) for worker_id, (_, count) in self.freed.items()]
        claimed = self.sql.claim_due_for(slots, lease_until(None, self.now), self.now)
        for worker_id, (channel, count) in self.freed.items():
            tasks = claimed.get(worker_id, [])
            for pk, data, timeout in tasks:
                if timeout is not None:
                    self.sql.set_lease(pk, lease_until(timeout, self.now))
                self.effects.assignments.append(Assignment(channel, str(pk), data))
            if len(tasks) < count:
                self.sql.give_back_slots(worker_id, count - len(tasks), self.now)


class Operation:
    """One change asked for by a connection, run in a :class:`Batch`.

    ``apply`` may raise :class:`ProtocolError` only before it wrote anything,
    so that a refused operation leaves the rest of its batch untouched.
    """

    # Whether it needs nothing but ``batch.sql``, so that its batch may run in
    # a transaction of its own on the event loop's SQLite connection
    # (``broker.embedded``), or on Django's PostgreSQL connection in fewer round
    # trips (``broker.postgres``); else its batch takes Django's transactions.
    sql_only: ClassVar[bool] = False

    def gathered(self) -> bool:
        """Whether its statement waits for the batch's :meth:`Batch.flush` (nothing runs before that reads it)."""
        return False

    def apply(self, batch: Batch) -> None:
        raise NotImplementedError

    def script(self, script: BatchScript, position: int) -> bool:
        """Write this operation into ``script`` (see :class:`BatchScript`); False if it must read first."""
        return False


@dataclass(frozen=True, slots=True)
class Submit(Operation):
    """REQUEST_TASK: store a new task (durable before it is announced to anyone).

    Within one ``clientId`` a repeated ``messageId`` creates nothing: for a
    task in flight the one outcome is still to come; for a finished task the
    stored outcome is sent again. Raises :class:`InFlightLimit` (creating
    nothing) when the client already has ``TURTLEMQ_MAX_CLIENT_IN_FLIGHT``
    unfinished tasks: counted in the database per ``clientId``; without one,
    the client is its connection and ``unanswered`` is that connection's count.
    """

    reply_channel: str
    client_id: str | None
    message_id: str
    data: str
    timeout: float | None = None
    max_attempts: int | None = None
    unanswered: int = 0
    sql_only: ClassVar[bool] = True

    def gathered(self) -> bool:
        return self.client_id is None  # a clientId's tasks are looked up first, one submit at a time

    def apply(self, batch: Batch) -> None:
        if self.client_id is None:
            self._check_connection_limit()
            batch.gather_insert(self)
        else:
            replay = self._insert_for_client(batch, self.client_id, settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT)
            if replay is not None:
                batch.effects += replay
                return
        batch.assign_round = True

    def script(self, script: BatchScript, position: int) -> bool:
        if self.client_id is not None:
            return False  # its messageId is looked up first
        try:
            self._check_connection_limit()
        except InFlightLimit as exc:
            script.errors[position] = exc
        else:
            script.new_tasks.append(self.row())
        return True

    def _check_connection_limit(self) -> None:
        """Without a ``clientId`` the client is its connection, which counts its own unanswered tasks."""
        limit = settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT
        if limit and self.unanswered >= limit:
            raise InFlightLimit(limit)

    def row(self) -> sql.NewTask:
        """The new task's columns for :meth:`sql.Statements.insert_tasks`."""
        max_attempts = self.max_attempts or settings.TURTLEMQ_MAX_ATTEMPTS
        return (self.message_id, self.client_id, self.reply_channel, self.data, self.timeout, max_attempts)

    def _insert(self, batch: Batch) -> None:
        batch.sql.insert_tasks([self.row()], batch.now)

    def _insert_for_client(self, batch: Batch, client_id: str, limit: int) -> Effects | None:
        """Insert unless ``messageId`` repeats; what a repeat owes the client, else None."""
        repeat, unfinished = batch.sql.client_task_counts(client_id, self.message_id)
        if repeat:
            return self._existing_outcome(batch, client_id) or Effects()
        if limit and unfinished >= limit:
            raise InFlightLimit(limit)
        try:
            # A savepoint: on PostgreSQL a failed insert would spoil the whole batch.
            with batch.sql.savepoint():
                self._insert(batch)
        except IntegrityError:
            # Another connection of the same clientId inserted this messageId
            # between our look-up and our insert: it is a repeat after all.
            replay = self._existing_outcome(batch, client_id)
            if replay is None:
                raise  # some other constraint failed: never report a lost task as a repeat
            return replay
        return None

    def _existing_outcome(self, batch: Batch, client_id: str) -> Effects | None:
        """What a repeated ``messageId`` owes the client: nothing yet (in flight), or its outcome again."""
        row = batch.sql.task_of_client(client_id, self.message_id)
        if row is None:
            return None
        pk, state, result = row
        if state in Task.UNFINISHED_STATES:
            return Effects()
        return Effects(outcomes=[_outcome(self.reply_channel, pk, self.message_id, state, result)])


@dataclass(frozen=True, slots=True)
class Complete(Operation):
    """RESPONSE_TASK: store the result of a task the worker holds and free its slot.

    Raises :class:`UnknownTask` (changing nothing) when the worker does not hold it.
    """

    worker_id: int
    worker_channel: str
    task_id: str
    result: str
    sql_only: ClassVar[bool] = True

    def gathered(self) -> bool:
        return True

    def apply(self, batch: Batch) -> None:
        batch.gather_completion(self)  # completed (or refused, in Batch.errors) at the next flush

    def script(self, script: BatchScript, position: int) -> bool:
        script.add_completion(position, self)
        return True


@dataclass(frozen=True, slots=True)
class Fail(Operation):
    """FAIL_TASK: retry after a backoff, or give up after the last attempt; the worker's slot frees up."""

    worker_id: int
    worker_channel: str
    task_id: str
    error: str

    def apply(self, batch: Batch) -> None:
        reply_channel, message_id, failures, max_attempts = _lock_held(
            self.worker_id, self.task_id, "reply_channel", "message_id", "failures", "max_attempts"
        )
        batch.effects.outcomes.extend(
            _record_failure(
                int(self.task_id), reply_channel, message_id, failures + 1, max_attempts, self.error, batch.now
            )
        )
        batch.free_slot(self.worker_id, self.worker_channel)


@dataclass(frozen=True, slots=True)
class Touch(Operation):
    """TOUCH_TASK: the worker still works on a task; renew its lease."""

    worker_id: int
    task_id: str

    def apply(self, batch: Batch) -> None:
        (timeout,) = _lock_held(self.worker_id, self.task_id, "timeout")
        lease = lease_until(timeout, batch.now)
        if lease is not None:
            Task.objects.filter(pk=int(self.task_id)).update(lease_expires_at=lease)


@dataclass(frozen=True, slots=True)
class MarkDelivered(Operation):
    """The outcomes of these tasks were sent to their clients."""

    task_ids: list[int]
    sql_only: ClassVar[bool] = True

    def gathered(self) -> bool:
        return True  # recorded in Batch.finish

    def apply(self, batch: Batch) -> None:
        batch.delivered.extend(self.task_ids)

    def script(self, script: BatchScript, position: int) -> bool:
        script.delivered.extend(self.task_ids)
        return True


@dataclass(frozen=True, slots=True)
class Release(Operation):
    """A connection closed: a worker's tasks go back to the queue and on to idle workers."""

    connection_id: int

    def apply(self, batch: Batch) -> None:
        batch.freed.pop(self.connection_id, None)  # its slots are gone with it
        if _release([self.connection_id], batch.now):
            batch.assign_round = True


def run_batch(
    operations: Sequence[Operation], pipelined: PipelinedConnection | None = None
) -> tuple[list[ProtocolError | DatabaseError | None], Effects]:
    """Run ``operations`` in one transaction: each one's error (None if it went through), and the effects.

    Should the transaction fail as a whole (a deadlock between broker
    processes on PostgreSQL, say), each operation runs again on its own, so
    that only the one at fault reports an error. ``pipelined``: operations that
    are all ``sql_only`` try their transaction there first (``broker.postgres``);
    the runs one by one take Django's transactions, where every statement
    answers at once, so that an error is told to the operation that made it.
    Should the connection to PostgreSQL break instead, the batch may have
    committed all the same: :func:`_settle_lost` looks before anything runs again.
    """
    lost, server_process = _driver_connection()  # PostgreSQL's; (None, 0) on SQLite
    now = timezone.now()
    try:
        return _run_together(operations, pipelined, now)
    except DatabaseError:
        if lost is not None and (lost.closed or lost.broken):
            try:
                settled = _settle_lost(operations, now, lost, server_process)
            except DatabaseError as exc:
                logger.error(
                    "could not learn whether a batch of %s operations committed", len(operations), exc_info=True
                )
                return [exc] * len(operations), Effects()
            if settled is not None:
                return settled
        if len(operations) == 1:
            if pipelined is None:
                raise
            return _run_together(operations)  # again in Django's transaction, which raises its error
        logger.warning("a batch of %s operations failed; running them one by one", len(operations), exc_info=True)
    errors: list[ProtocolError | DatabaseError | None] = []
    effects = Effects()
    for operation in operations:
        try:
            (error,), own_effects = _run_together([operation])
        except DatabaseError as exc:
            errors.append(exc)
            continue
        errors.append(error)
        effects += own_effects
    return errors, effects


def run_batch_on_loop(
    operations: Sequence[Operation], connection: LoopConnection
) -> tuple[list[ProtocolError | DatabaseError | None], Effects]:
    """Run operations that are all ``sql_only`` in one transaction on an event loop's SQLite connection.

    Raises :class:`~broker.embedded.Busy` (having changed nothing) while
    another connection writes, and any database error after rolling back the
    whole batch: the caller then runs it with :func:`run_batch`.
    """
    return _run_together(operations, connection)


def _run_together(
    operations: Sequence[Operation],
    own_connection: LoopConnection | PipelinedConnection | None = None,
    now: datetime | None = None,
) -> tuple[list[ProtocolError | DatabaseError | None], Effects]:
    with transaction.atomic() if own_connection is None else own_connection.transaction():
        batch = Batch(now or timezone.now(), sql.Statements(own_connection))
        for position, operation in enumerate(operations):
            batch.position = position
            if not operation.gathered():
                batch.flush()  # it may read what those before it wrote
            try:
                operation.apply(batch)
            except ProtocolError as exc:
                batch.errors[position] = exc
        batch.finish()
    errors: list[ProtocolError | DatabaseError | None] = [batch.errors.get(i) for i in range(len(operations))]
    return errors, batch.effects


def _driver_connection() -> tuple[Any, int]:
    """PostgreSQL: the driver's connection under Django's that a batch is about to use, and its server process's pid.

    (None, 0) elsewhere, or when there is no connection to be had.

    Kept by the batch (see _settle_lost): should it break, Django may have
    replaced it by the time the batch's error arrives, and a broken one no
    longer tells its pid.
    """
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "postgresql":
        return None, 0
    try:
        db.ensure_connection()
    except DatabaseError:
        return None, 0  # the batch fails before it can write anything
    return db.connection, db.connection.info.backend_pid


def _settle_lost(
    operations: Sequence[Operation], now: datetime, lost: Any, server_process: int
) -> tuple[list[ProtocolError | DatabaseError | None], Effects] | None:
    """A batch whose driver connection ``lost`` broke: its errors and effects if it committed all the same, None if not.

    ``server_process``: the pid of the server process of ``lost``.

    The lost connection's server process is ended first (what it had not
    committed is rolled back there), so that nothing of the batch commits after
    the look; then what the batch wrote is looked for at its timestamp: new
    tasks, completions and final failures, closed connections. Found, the
    batch committed: what the rows say it handed out and finished is
    announced, the submissions and completions the rows show went through, and
    every other operation fails (its answer, a refusal perhaps, is lost: its
    connection closes and its peer resumes).
    Tried ``SETTLE_ATTEMPTS`` times; raises DatabaseError when that cannot be made sure of.
    """
    db = connections[DEFAULT_DB_ALIAS]
    if db.connection is lost:
        db.close()  # the next statement opens another
    attempts_left = SETTLE_ATTEMPTS
    while True:
        attempts_left -= 1
        try:
            return _look_for_lost(operations, now, server_process)
        except DatabaseError as exc:
            if not attempts_left:
                raise
            logger.warning("could not learn yet whether a batch of %s operations committed: %r", len(operations), exc)
            db.close()
        time.sleep(SETTLE_RETRY_SECONDS)


def _look_for_lost(
    operations: Sequence[Operation], now: datetime, server_process: int
) -> tuple[list[ProtocolError | DatabaseError | None], Effects] | None:
    """One look of :func:`_settle_lost`."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity WHERE pid = %s AND backend_start <= %s",
            [int(LOST_PROCESS_TIMEOUT * 1000), server_process, now],
        )
        if not all(ended for (ended,) in cursor.fetchall()):
            raise OperationalError(f"the server process {server_process} of a lost connection did not end")
    submitted = [op for op in operations if isinstance(op, Submit)]
    message_ids, reply_channels = {op.message_id for op in submitted}, {op.reply_channel for op in submitted}
    finished = [int(op.task_id) for op in operations if isinstance(op, Complete | Fail) and _is_task_id(op.task_id)]
    released = [op.connection_id for op in operations if isinstance(op, Release)]
    # An empty list asks nothing of the database.
    stored = set(
        Task.objects.filter(created_at=now, message_id__in=message_ids, reply_channel__in=reply_channels).values_list(
            "message_id", "reply_channel"
        )
    )
    # The tasks it finished: (pk, worker, state, reply_channel, message_id, result, delivered_at).
    finished_rows = list(
        Task.objects.filter(pk__in=finished, finished_at=now).values_list(
            "pk", "worker_id", "state", "reply_channel", "message_id", "result", "delivered_at"
        )
    )
    completed = {(pk, worker_id, state) for pk, worker_id, state, *_ in finished_rows}
    closed = Connection.objects.filter(pk__in=released, disconnected_at=now).exists()
    if not (stored or completed or closed):
        # Or nothing of it shows, and what it did is harmless to do again: a retry's
        # backoff, a lease, a delivery mark (a failure reported again is refused).
        return None
    logger.warning("a batch of %s operations committed, but its answer was lost with the connection", len(operations))
    lost = OperationalError("lost the database connection after a batch committed: this operation's answer is lost")

    def answer(operation: Operation) -> OperationalError | None:
        """None where the rows show the operation went through; else it may have been refused: unknown."""
        if isinstance(operation, Submit):
            return None if (operation.message_id, operation.reply_channel) in stored else lost
        if isinstance(operation, Complete):
            key = _completion_key(operation)
            return None if key is not None and (*key, sql.DONE) in completed else lost
        if isinstance(operation, Release | MarkDelivered):
            return None  # nobody waits for these
        return lost  # a failure or a lease renewal: whether it was refused does not show

    outcomes = [
        _outcome(reply_channel, pk, message_id, state, result)
        for pk, _, state, reply_channel, message_id, result, delivered_at in finished_rows
        if delivered_at is None
    ]
    handed_out = [
        Assignment(worker_channel, str(pk), data)
        for pk, data, worker_channel in Task.objects.assigned()
        .filter(assigned_at=now, worker__disconnected_at__isnull=True)
        .values_list("pk", "data", "worker__channel_name")
    ]
    return [answer(operation) for operation in operations], Effects(assignments=handed_out, outcomes=outcomes)


def run_one(operation: Operation) -> Effects:
    """Run one operation in a transaction of its own; raise its error or return the effects."""
    (error,), effects = run_batch([operation])
    if error is not None:
        raise error
    return effects


# --- batches written out whole: one round trip (broker.pgloop) -------------------------


Done = dict[tuple[int, int], tuple[str, str]]  # (task id, worker id) -> (reply_channel, message_id)


@dataclass
class BatchScript:
    """A batch written out before anything of it runs, so that it can be sent whole.

    Most batches under load are made of submissions without a ``clientId``,
    completions and delivery marks. None of them needs to read the database
    to know what to write: the statements of ``broker.pgloop`` take them as
    arrays and decide the rest themselves (which completions take, which
    queued tasks go to which worker), in the order :class:`Batch` does, so the
    whole batch travels to PostgreSQL in one round trip. Any other operation
    reads before it writes (a ``clientId``'s messageId, the task a failure
    names): its batch runs with :func:`run_batch`.

    What the statements answer comes back through :meth:`effects`, which
    refuses the completions that did not take, as :meth:`Batch._complete` does.
    """

    now: datetime
    new_tasks: list[sql.NewTask] = field(default_factory=list)
    # (task id, worker id, result) of each task's first completion in the batch, in order.
    completions: list[tuple[int, int, str]] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    errors: dict[int, ProtocolError] = field(default_factory=dict)  # by position: refused before anything ran
    _completing: list[tuple[int, Complete]] = field(default_factory=list)  # every completion, with its position
    _channels: dict[int, str] = field(default_factory=dict)  # worker id -> its channel
    _keys: set[tuple[int, int]] = field(default_factory=set)  # (task, worker) of ``completions``

    @property
    def assign_round(self) -> bool:
        """New tasks may go to idle workers (as :meth:`Submit.apply` asks of a batch)."""
        return bool(self.new_tasks)

    @property
    def default_lease(self) -> datetime | None:
        """When a task handed out now without a ``timeout`` of its own is taken back."""
        return lease_until(None, self.now)

    def add_completion(self, position: int, complete: Complete) -> None:
        self._completing.append((position, complete))
        self._channels[complete.worker_id] = complete.worker_channel
        key = _completion_key(complete)
        if key is not None and key not in self._keys:
            self._keys.add(key)
            self.completions.append((*key, complete.result))

    def _judged(self, done: Done) -> Iterator[tuple[int, Complete, tuple[int, int] | None]]:
        """Each completion with its (task, worker) if it took, None if refused: not held, or a repeat."""
        taken: set[tuple[int, int]] = set()
        for position, complete in self._completing:
            key = _completion_key(complete)
            if key is None or key not in done or key in taken:
                yield position, complete, None
            else:
                taken.add(key)
                yield position, complete, key

    def refused_workers(self, done: Done) -> set[int]:
        """Workers with a completion that did not take: their error names the tasks they hold."""
        return {complete.worker_id for _, complete, key in self._judged(done) if key is None}

    def effects(
        self,
        count: int,
        done: Done,
        handed_out: list[tuple[int, int, str, str | None]],
        held: dict[int, list[tuple[int, str]]],
    ) -> tuple[list[ProtocolError | DatabaseError | None], Effects]:
        """Each of the ``count`` operations' error, and the effects, from what the statements answered.

        ``handed_out``: (task id, worker id, data, worker channel) of each
        task given to a worker (the channel is None for those of the refill: a
        worker that completed, whose channel is known here); ``held``: (task
        id, data) each refused worker holds.
        """
        errors = dict(self.errors)
        effects = Effects()
        for position, complete, key in self._judged(done):
            if key is None:
                worker_held = [(str(pk), data) for pk, data in held.get(complete.worker_id, [])]
                errors[position] = UnknownTask(complete.task_id, worker_held)
                continue
            reply_channel, message_id = done[key]
            effects.outcomes.append(Outcome(reply_channel, key[0], message_id, True, complete.result))
        effects.assignments.extend(
            Assignment(channel or self._channels[worker_id], str(pk), data)
            for pk, worker_id, data, channel in sorted(handed_out)
        )
        return [errors.get(position) for position in range(count)], effects


def _completion_key(complete: Complete) -> tuple[int, int] | None:
    """(task id, worker id) of a completion; None for a taskId that can name no task."""
    return (int(complete.task_id), complete.worker_id) if _is_task_id(complete.task_id) else None


def script_batch(operations: Sequence[Operation]) -> BatchScript | None:
    """``operations`` written out as one :class:`BatchScript`; None if one of them must read first."""
    script = BatchScript(timezone.now())
    for position, operation in enumerate(operations):
        if not operation.script(script, position):
            return None
    return script


# --- the life of a task, one operation at a time (tools, tests) ------------------------


def submit_task(
    reply_channel: str,
    client_id: str | None,
    message_id: str,
    data: str,
    timeout: float | None = None,
    max_attempts: int | None = None,
    unanswered: int = 0,
) -> Effects:
    """Store a new task and assign what can be assigned (see :class:`Submit`)."""
    return run_one(Submit(reply_channel, client_id, message_id, data, timeout, max_attempts, unanswered))


def complete_task(worker_id: int, task_id: str, result: str) -> Effects:
    """A worker returned the result of a task it holds (see :class:`Complete`)."""
    return run_one(Complete(worker_id, _channel_of(worker_id), task_id, result))


def fail_task(worker_id: int, task_id: str, error: str) -> Effects:
    """A worker reported a failure (see :class:`Fail`)."""
    return run_one(Fail(worker_id, _channel_of(worker_id), task_id, error))


def _channel_of(connection_id: int) -> str:
    return Connection.objects.filter(pk=connection_id).values_list("channel_name", flat=True).first() or ""


def touch_task(worker_id: int, task_id: str) -> Effects:
    """A worker still works on a task: renew its lease."""
    return run_one(Touch(worker_id, task_id))


def mark_delivered(task_ids: list[int]) -> Effects:
    """The outcomes of these tasks were sent to their clients."""
    return run_one(MarkDelivered(task_ids))


def lease_until(timeout: float | None, now: datetime) -> datetime | None:
    """When a task handed out (or touched) at ``now`` is taken back: its own timeout, else the default lease."""
    seconds = timeout if timeout is not None else settings.TURTLEMQ_DEFAULT_LEASE
    return now + timedelta(seconds=seconds) if seconds else None


def expire_leases(now: datetime) -> Effects:
    """Take back tasks held past their lease; each expiry counts as a failed attempt."""
    effects = Effects()
    for pk, worker_id in Task.objects.lease_expired(now).values_list("pk", "worker_id"):
        with transaction.atomic():
            try:
                reply_channel, message_id, failures, max_attempts = _lock_held(
                    worker_id, str(pk), "reply_channel", "message_id", "failures", "max_attempts"
                )
            except UnknownTask:
                continue  # finished or released meanwhile
            effects.outcomes.extend(
                _record_failure(pk, reply_channel, message_id, failures + 1, max_attempts, "lease expired", now)
            )
            # The slot is free from now on: a silent worker must not count as
            # idle since before its lease, or it would get the task straight back.
            sql.Statements().give_back_slots(worker_id, 1, now)
            effects.assignments.extend(_assign(now))
    return effects


def _is_task_id(task_id: str) -> bool:
    """Whether a wire taskId can name a task at all (ids are decimal and fit a 64-bit integer)."""
    return task_id.isdecimal() and len(task_id) < 19


def _held(worker_id: int) -> list[tuple[str, str]]:
    """(taskId, data) of the tasks a worker holds: what rule 4 reminds it of."""
    return [(str(pk), data) for pk, data in Task.objects.held_by(worker_id).values_list("pk", "data")]


def _lock_held(worker_id: int, task_id: str, *fields: str) -> tuple:
    """Lock the task ``worker_id`` holds under ``task_id`` and read ``fields`` of it.

    Locking first means a concurrent change (a client resuming elsewhere, an
    operator cancelling) is either fully before or fully after ours.
    """
    row = None
    if _is_task_id(task_id):
        row = Task.objects.select_for_update().held_by(worker_id).filter(pk=int(task_id)).values_list(*fields).first()
    if row is None:
        raise UnknownTask(task_id, _held(worker_id))
    return row


def _record_failure(
    pk: int, reply_channel: str, message_id: str, failures: int, max_attempts: int, error: str, now: datetime
) -> list[Outcome]:
    """Queue a failed task for a retry after its backoff, or end it as FAILED."""
    if failures >= max_attempts:
        Task.objects.filter(pk=pk).update(
            state=Task.State.FAILED,
            failures=failures,
            result=error,
            last_error=error,
            finished_at=now,
            lease_expires_at=None,
        )
        return [Outcome(reply_channel, pk, message_id, False, error)]
    backoff = settings.TURTLEMQ_RETRY_BACKOFF * 2 ** (failures - 1)
    Task.objects.filter(pk=pk).update(
        state=Task.State.QUEUED,
        failures=failures,
        last_error=error,
        worker=None,
        lease_expires_at=None,
        not_before=now + timedelta(seconds=backoff),
    )
    return []


def _outcome(reply_channel: str, pk: int, message_id: str, state: str, result: str | None) -> Outcome:
    if state == Task.State.DONE:
        return Outcome(reply_channel, pk, message_id, True, result or "")
    if state == Task.State.CANCELLED:
        return Outcome(reply_channel, pk, message_id, False, result or "cancelled by an operator")
    return Outcome(reply_channel, pk, message_id, False, result or "")


# --- assignment ----------------------------------------------------------------------


def _assign(now: datetime, statements: sql.Statements | None = None) -> list[Assignment]:
    """Give due queued tasks, oldest first, to free workers, longest idle first.

    Must run inside a transaction. On PostgreSQL the candidate rows are locked
    with SKIP LOCKED so that concurrent rounds in other processes take other
    rows; the updates are compare-and-set all the same, so SQLite (one writer)
    and any surprise stay correct.
    """
    run = statements or sql.Statements()
    workers = run.free_workers(WORKERS_PER_ROUND)
    if not workers:
        return []
    tasks = run.due_tasks(now, sum(free for _, _, free in workers))
    if not tasks:
        return []
    channels = {pk: channel for pk, channel, _ in workers}
    assignments: list[Assignment] = []
    for worker_id, worker_tasks in _deal(tasks, workers).items():
        if not run.take_slots(worker_id, len(worker_tasks), now):
            continue  # it closed, or another process filled it meanwhile
        claimed = _claim(run, worker_id, channels[worker_id], worker_tasks, now)
        if len(claimed) < len(worker_tasks):
            # Someone else took some of them: keep what we got, give back the rest.
            run.give_back_slots(worker_id, len(worker_tasks) - len(claimed), now)
        assignments.extend(claimed)
    return assignments


def _deal(tasks: list[sql.TaskRow], workers: list[tuple[int, str, int]]) -> dict[int, list[sql.TaskRow]]:
    """Deal tasks out one slot per worker at a time, in the workers' order: worker id -> its tasks."""
    plan: dict[int, list[sql.TaskRow]] = {}
    ring = deque([pk, free] for pk, _, free in workers if free > 0)
    for task in tasks:
        if not ring:
            break
        slot = ring.popleft()
        plan.setdefault(slot[0], []).append(task)
        if slot[1] > 1:
            slot[1] -= 1
            ring.append(slot)
    return plan


def _claim(
    run: sql.Statements, worker_id: int, channel: str, tasks: list[sql.TaskRow], now: datetime
) -> list[Assignment]:
    """Hand ``tasks`` to a worker whose slots are already counted; the assignments it got (compare-and-set)."""
    by_lease: dict[datetime | None, list[int]] = {}
    for pk, _, timeout in tasks:
        by_lease.setdefault(lease_until(timeout, now), []).append(pk)
    claimed: set[int] = set()
    for lease, task_ids in by_lease.items():
        claimed |= run.claim_tasks(task_ids, worker_id, lease, now)
    return [Assignment(channel, str(pk), data) for pk, data, _ in tasks if pk in claimed]


# --- status and operator actions ----------------------------------------------------------


def broker_status() -> dict[str, int]:
    """Counts for the STATUS frame and the admin."""
    workers = (
        Connection.objects.live()
        .workers()
        .aggregate(
            idle=Count("pk", filter=Q(in_flight=0)),
            busy=Count("pk", filter=Q(in_flight__gt=0)),
        )
    )
    clients = Connection.objects.live().clients().count()
    return {
        "idleWorkers": workers["idle"],
        "busyWorkers": workers["busy"],
        "clients": clients,
        # One count per state: each is read from that state's partial index.
        "queuedTasks": Task.objects.queued().count(),
        "runningTasks": Task.objects.assigned().count(),
    }


def cancel_tasks(task_ids: list[int], reason: str = "cancelled by an operator") -> Effects:
    """Cancel unfinished tasks; their clients get TASK_FAILED and their workers' slots free up."""
    now = timezone.now()
    effects = Effects()
    with transaction.atomic():
        rows = list(
            Task.objects.select_for_update()
            .unfinished()
            .filter(pk__in=task_ids)
            .values_list("pk", "reply_channel", "message_id", "worker_id", "state")
        )
        for pk, reply_channel, message_id, worker_id, state in rows:
            Task.objects.filter(pk=pk).update(
                state=Task.State.CANCELLED, result=reason, finished_at=now, lease_expires_at=None
            )
            if state == Task.State.ASSIGNED and worker_id is not None:
                sql.Statements().give_back_slots(worker_id, 1, now)
            effects.outcomes.append(Outcome(reply_channel, pk, message_id, False, reason))
        effects.assignments.extend(_assign(now))
    return effects


def requeue_tasks(task_ids: list[int]) -> tuple[int, Effects]:
    """Put tasks back in the queue; returns how many went back (queued and done tasks stay as they are).

    Failed or cancelled tasks start again with fresh attempts; assigned ones are
    taken from their worker (whose late result is then refused).
    """
    now = timezone.now()
    with transaction.atomic():
        taken = list(Task.objects.select_for_update().assigned().filter(pk__in=task_ids).values_list("pk", "worker_id"))
        for pk, worker_id in taken:
            Task.objects.filter(pk=pk).update(state=Task.State.QUEUED, worker=None, lease_expires_at=None)
            if worker_id is not None:
                sql.Statements().give_back_slots(worker_id, 1, now)
        restarted = Task.objects.filter(pk__in=task_ids, state__in=(Task.State.FAILED, Task.State.CANCELLED)).update(
            state=Task.State.QUEUED,
            worker=None,
            failures=0,
            result=None,
            finished_at=None,
            delivered_at=None,
            not_before=None,
            lease_expires_at=None,
        )
        return len(taken) + restarted, Effects(assignments=_assign(now))


def requeue_orphans(assign: bool = True) -> tuple[int, Effects]:
    """Release tasks held by connections that are gone; returns how many went back to the queue.

    Broker processes silent for longer than ``TURTLEMQ_PROCESS_DEAD_AFTER`` are
    reaped in the same transaction, so their workers' tasks are counted too.
    With ``assign=False`` the tasks wait for the broker processes' next
    housekeeping round: for a caller whose channel layer cannot reach them.
    """
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.TURTLEMQ_PROCESS_DEAD_AFTER)
    with transaction.atomic():
        BrokerProcess.objects.silent_since(cutoff).update(stopped_at=now)
        count = _requeue_orphans(now)
        return count, Effects(assignments=_assign(now) if assign else [])


def _requeue_orphans(now: datetime) -> int:
    """Requeue assigned tasks whose worker is gone and close the connections of stopped processes.

    Must run inside a transaction. The workers of those tasks are all closed
    (or closed here), so they hold nothing any more.
    """
    # Lock only the task rows: PostgreSQL refuses FOR UPDATE on the
    # nullable side of the outer joins that orphaned() needs.
    orphans = list(Task.objects.orphaned().select_for_update(of=("self",)).values_list("pk", "worker_id"))
    Task.objects.orphaned().filter(pk__in=[pk for pk, _ in orphans]).update(
        state=Task.State.QUEUED, worker=None, lease_expires_at=None
    )
    Connection.objects.filter(pk__in={worker_id for _, worker_id in orphans if worker_id}).update(in_flight=0)
    stray = list(Connection.objects.live().filter(process__stopped_at__isnull=False).values_list("pk", flat=True))
    _release(stray, now)
    return len(orphans)


def purge_finished_tasks(older_than: timedelta) -> int:
    """Delete finished tasks (and long-closed connection rows) older than ``older_than``."""
    cutoff = timezone.now() - older_than
    with transaction.atomic():
        deleted, _ = Task.objects.finished_before(cutoff).delete()
        Connection.objects.filter(disconnected_at__lt=cutoff, tasks__isnull=True).delete()
        BrokerProcess.objects.filter(stopped_at__lt=cutoff, connections__isnull=True).delete()
    return deleted
