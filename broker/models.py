"""Tables of the task broker: broker processes, connections and tasks.

The database is the source of truth: every task and every registered
connection is a row here, so that any broker process can take over the work of
another. The QuerySet methods below are the query vocabulary the domain layer
(``broker.dispatch``) speaks; state changes themselves live in that module.
"""

from __future__ import annotations

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q

from subscriptions.names import is_pattern


class BrokerProcessQuerySet(models.QuerySet["BrokerProcess"]):
    def running(self) -> BrokerProcessQuerySet:
        """Processes that have not said they stopped."""
        return self.filter(stopped_at__isnull=True)

    def silent_since(self, cutoff: datetime) -> BrokerProcessQuerySet:
        """Running processes whose last heartbeat is older than ``cutoff``."""
        return self.running().filter(heartbeat_at__lt=cutoff)


class BrokerProcess(models.Model):
    """One running broker server process (daphne, uvicorn, ...)."""

    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)

    objects = BrokerProcessQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "broker processes"

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid} (#{self.pk})"


class ConnectionQuerySet(models.QuerySet["Connection"]):
    def live(self) -> ConnectionQuerySet:
        """Connections that have not been closed (as far as the database knows)."""
        return self.filter(disconnected_at__isnull=True)

    def workers(self) -> ConnectionQuerySet:
        return self.filter(role=Connection.Role.WORKER)

    def clients(self) -> ConnectionQuerySet:
        return self.filter(role=Connection.Role.CLIENT)

    def with_free_slot(self) -> ConnectionQuerySet:
        """Live workers holding fewer tasks than their concurrency allows."""
        return self.live().workers().filter(in_flight__lt=F("concurrency"))

    def longest_idle_first(self) -> ConnectionQuerySet:
        return self.order_by("ready_at", "pk")

    def held_by_processes(self, process_ids: list[int]) -> ConnectionQuerySet:
        return self.live().filter(process_id__in=process_ids)


class Connection(models.Model):
    """A registered WebSocket connection: a client or a worker.

    The row names the broker process that holds the socket, so that when that
    process dies the others can release what its workers held.
    """

    class Role(models.TextChoices):
        CLIENT = "client"  # submits tasks, receives results
        WORKER = "worker"  # receives tasks, returns results

    channel_name = models.CharField(max_length=200, unique=True)
    role = models.CharField(max_length=10, choices=Role.choices)
    process = models.ForeignKey(BrokerProcess, on_delete=models.PROTECT, related_name="connections")
    # The stable name a client chose (REGISTER_CLIENT.clientId), if any.
    client_id = models.CharField(max_length=256, null=True, blank=True)
    # Workers only: how many tasks it may hold, how many it holds, and since
    # when it has had a free slot (the longest-idle worker gets the next task).
    concurrency = models.PositiveIntegerField(default=1)
    in_flight = models.PositiveIntegerField(default=0)
    ready_at = models.DateTimeField(null=True, blank=True)
    remote_addr = models.CharField(max_length=100, blank=True, default="")
    connected_at = models.DateTimeField(auto_now_add=True)
    disconnected_at = models.DateTimeField(null=True, blank=True)

    objects = ConnectionQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["role", "disconnected_at", "ready_at"], name="connection_dispatch_idx"),
            models.Index(fields=["client_id"], name="connection_client_id_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(in_flight__lte=F("concurrency")), name="connection_in_flight_within_concurrency"
            ),
        ]

    def __str__(self) -> str:
        name = self.client_id or self.channel_name
        return f"{self.role} {name}"


class WorkerConnection(Connection):
    """Worker connections, for their own page in the admin (the rows are ``Connection`` rows)."""

    class Meta:
        proxy = True
        verbose_name = "worker"


class ClientConnection(Connection):
    """Client connections, for their own page in the admin (the rows are ``Connection`` rows)."""

    class Meta:
        proxy = True
        verbose_name = "client"


class TaskQuerySet(models.QuerySet["Task"]):
    def queued(self) -> TaskQuerySet:
        return self.filter(state=Task.State.QUEUED)

    def due(self, now: datetime) -> TaskQuerySet:
        """Queued tasks whose retry backoff (if any) has passed, oldest first."""
        return self.queued().filter(Q(not_before__isnull=True) | Q(not_before__lte=now)).order_by("pk")

    def assigned(self) -> TaskQuerySet:
        return self.filter(state=Task.State.ASSIGNED)

    def unfinished(self) -> TaskQuerySet:
        return self.filter(state__in=Task.UNFINISHED_STATES)

    def finished(self) -> TaskQuerySet:
        return self.filter(state__in=Task.FINISHED_STATES)

    def held_by(self, worker_id: int) -> TaskQuerySet:
        return self.assigned().filter(worker_id=worker_id).order_by("pk")

    def lease_expired(self, now: datetime) -> TaskQuerySet:
        return self.assigned().filter(lease_expires_at__lt=now)

    def orphaned(self) -> TaskQuerySet:
        """Assigned tasks whose worker connection is gone or whose process stopped."""
        return self.assigned().filter(
            Q(worker__isnull=True)
            | Q(worker__disconnected_at__isnull=False)
            | Q(worker__process__stopped_at__isnull=False)
        )

    def undelivered_results_for(self, client_id: str) -> TaskQuerySet:
        """Finished tasks of a client whose outcome it has not been sent yet."""
        return self.finished().filter(client_id=client_id, delivered_at__isnull=True).order_by("finished_at", "pk")

    def finished_before(self, cutoff: datetime) -> TaskQuerySet:
        return self.finished().filter(finished_at__lt=cutoff)


class Task(models.Model):
    """A unit of work submitted by a client. The state machine is in ``broker.dispatch``."""

    class State(models.TextChoices):
        QUEUED = "queued"  # waiting for a worker (or for its retry backoff)
        ASSIGNED = "assigned"  # held by exactly one live worker
        DONE = "done"  # a worker returned a result
        FAILED = "failed"  # ran out of attempts; the client got TASK_FAILED
        CANCELLED = "cancelled"  # an operator cancelled it; the client got TASK_FAILED

    UNFINISHED_STATES = (State.QUEUED, State.ASSIGNED)
    FINISHED_STATES = (State.DONE, State.FAILED, State.CANCELLED)

    message_id = models.CharField(max_length=256)
    # The stable clientId of the submitter, when it gave one: results wait for
    # it across reconnects and messageIds are de-duplicated within it.
    client_id = models.CharField(max_length=256, null=True, blank=True)
    # Channel of the client connection that receives the outcome.
    reply_channel = models.CharField(max_length=200)
    data = models.TextField()
    result = models.TextField(null=True, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    # No index of its own: task_worker_idx starts with it.
    worker = models.ForeignKey(
        Connection, null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks", db_index=False
    )
    attempts = models.PositiveIntegerField(default=0, help_text="How often the task was handed to a worker.")
    failures = models.PositiveIntegerField(default=0, help_text="How often a worker reported it failed.")
    max_attempts = models.PositiveIntegerField()
    timeout = models.FloatField(null=True, blank=True, help_text="Lease in seconds (REQUEST_TASK.timeout).")
    lease_expires_at = models.DateTimeField(null=True, blank=True, help_text="When an assigned task is taken back.")
    last_error = models.TextField(blank=True, default="", help_text="The latest failure a worker reported.")
    not_before = models.DateTimeField(null=True, blank=True, help_text="Retry backoff: not dispatched before.")
    created_at = models.DateTimeField(auto_now_add=True)
    assigned_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True, help_text="When the outcome was sent to the client.")

    objects = TaskQuerySet.as_manager()

    class Meta:
        # Each change of state rewrites the task's entries in the indexes with
        # ``state``, so they are few: tasks by state, what a worker holds, and
        # a client's tasks, for tasks with a clientId only. The ORM compares
        # ``state`` with a parameter, which SQLite cannot match against a
        # partial index's condition: these stay whole.
        #
        # The queue itself (the oldest queued tasks, looked up by every
        # refill) has a partial index of its own, which the look-ups in
        # ``broker.sql`` name literally. With the whole (state, id) index
        # alone, PostgreSQL's plan depended on its statistics: taken while a
        # burst was queued, they had it walk the primary key from the oldest
        # task ever, past every finished one (measured: 0.6 ms for a claim
        # after 2,400 tasks, and growing with the table, until the next
        # ANALYZE); the partial index holds the queued tasks only. SQLite,
        # which plans by the schema, reads (state, id) all the same: the
        # partial index costs it a few microseconds per task (measured 1-6).
        indexes = [
            models.Index(fields=["id"], condition=Q(state="queued"), name="task_queued_idx"),
            models.Index(fields=["state", "id"], name="task_queue_idx"),
            models.Index(fields=["worker", "state"], name="task_worker_idx"),
            models.Index(
                fields=["client_id", "state"], condition=Q(client_id__isnull=False), name="task_client_state_idx"
            ),
            models.Index(fields=["message_id"], name="task_message_id_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["client_id", "message_id"],
                condition=Q(client_id__isnull=False),
                name="task_unique_message_per_client",
            ),
        ]

    def __str__(self) -> str:
        return f"task {self.pk} ({self.state})"

    @property
    def task_id(self) -> str:
        """The broker's id for the task on the wire."""
        return str(self.pk)


def validate_topic_patterns(value: str) -> None:
    """Django validator for :attr:`AccessKey.topics`: one topic pattern per line."""
    bad = [line.strip() for line in value.splitlines() if line.strip() and not is_pattern(line.strip())]
    if bad:
        raise ValidationError(
            "Not a topic pattern: %(bad)s. Use dot-separated words of letters, digits, '_' and '-', or '*' and '#'.",
            code="invalid_topic_pattern",
            params={"bad": ", ".join(bad)},
        )


class AccessKeyQuerySet(models.QuerySet["AccessKey"]):
    def active(self) -> AccessKeyQuerySet:
        """Keys that have not been revoked."""
        return self.filter(active=True)


class AccessKey(models.Model):
    """A credential a peer presents when access control is on (PROTOCOL.md, "Access control").

    Only the SHA-256 of the key is stored: the key itself is shown once, when
    it is made (``broker.access``). Its roles say which frames it may send;
    ``topics`` may narrow publishing and subscribing to some topic patterns.
    """

    class Role(models.TextChoices):
        CLIENT = "client"  # REGISTER_CLIENT, REQUEST_TASK
        WORKER = "worker"  # REGISTER_WORKER, RESPONSE_TASK, FAIL_TASK, TOUCH_TASK
        PUBLISHER = "publisher"  # PUBLISH (and the HTTP publish API)
        SUBSCRIBER = "subscriber"  # LIST_TOPICS, SUBSCRIBE, UNSUBSCRIBE

    name = models.CharField(max_length=100, help_text="Who or what uses the key.")
    # The key's first characters (never secret), so that an operator can tell keys apart.
    prefix = models.CharField(max_length=16, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False, help_text="SHA-256 of the key, in hex.")
    client = models.BooleanField("client role", default=False, help_text="May submit tasks.")
    worker = models.BooleanField("worker role", default=False, help_text="May take and answer tasks.")
    publisher = models.BooleanField("publisher role", default=False, help_text="May publish to topics.")
    subscriber = models.BooleanField(
        "subscriber role", default=False, help_text="May list topics, subscribe and unsubscribe."
    )
    topics = models.TextField(
        blank=True,
        default="",
        validators=[validate_topic_patterns],
        help_text="Topic patterns (one per line; * is one word, # any words) this key may publish to and "
        "subscribe within. Empty: every topic.",
    )
    active = models.BooleanField(default=True, help_text="Unticked, the key is revoked: it is refused.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, help_text="When a peer last presented it (to a minute).")

    objects = AccessKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "access key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(role for role in self.Role.values if getattr(self, role))

    @property
    def topic_patterns(self) -> tuple[str, ...]:
        return tuple(line.strip() for line in self.topics.splitlines() if line.strip())
