"""The operator's view of the task broker in Django's admin.

Tasks can be looked at, filtered and searched; an operator changes them only
through the actions "Requeue" and "Cancel", which call the same domain
functions as the broker (``broker.dispatch``) and then tell the peers
concerned, so that a cancelled task's client gets TASK_FAILED and a requeued
task goes to an idle worker. Workers, clients and broker processes are
read-only: their rows belong to the running broker. Access keys are made here
(the new key is shown once, on the page after "Save"), changed and revoked;
connections using a changed key pick up the change at once.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.translation import ngettext

from . import access, dispatch, events
from .models import AccessKey, BrokerProcess, ClientConnection, Connection, Task, WorkerConnection


class ReadOnlyMixin:
    """Viewable, never added, changed or deleted by hand: the broker owns these rows."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """A read-only model admin."""


def _changelist_link(model: type, text: object, **params: object) -> str:
    url = reverse(f"admin:broker_{model._meta.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(params), text)


def _change_link(model: type, pk: int, text: object) -> str:
    return format_html('<a href="{}">{}</a>', reverse(f"admin:broker_{model._meta.model_name}_change", args=[pk]), text)


# --- tasks ------------------------------------------------------------------------


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    """Tasks: filter by state, search by messageId, clientId or taskId; requeue or cancel."""

    list_display = (
        "task_id",
        "message_id",
        "client_id",
        "state",
        "worker_link",
        "attempts",
        "failures",
        "created_at",
        "finished_at",
    )
    list_display_links = ("task_id",)
    list_filter = ("state",)
    list_select_related = ("worker",)
    # Exact, case-sensitive matches, which use the indexes on message_id and
    # client_id; a number also finds the task with that id (get_search_results).
    search_fields = ("message_id__exact", "client_id__exact")
    search_help_text = "An exact messageId, clientId or taskId."
    ordering = ("-pk",)
    # Counting every task on each page view is the slow part on a big table.
    show_full_result_count = False
    actions = ("requeue", "cancel")
    fieldsets = (
        (None, {"fields": ("task_id", "message_id", "client_id", "state", "worker_link")}),
        ("Payload", {"fields": ("data", "result", "last_error")}),
        (
            "Attempts",
            {"fields": ("attempts", "failures", "max_attempts", "timeout", "lease_expires_at", "not_before")},
        ),
        ("Times", {"fields": ("created_at", "assigned_at", "finished_at", "delivered_at")}),
        ("Routing", {"classes": ("collapse",), "fields": ("reply_channel",)}),
    )
    readonly_fields = (
        "task_id",
        "message_id",
        "client_id",
        "state",
        "worker_link",
        "data",
        "result",
        "last_error",
        "attempts",
        "failures",
        "max_attempts",
        "timeout",
        "lease_expires_at",
        "not_before",
        "created_at",
        "assigned_at",
        "finished_at",
        "delivered_at",
        "reply_channel",
    )

    @admin.display(description="taskId", ordering="pk")
    def task_id(self, task: Task) -> str:
        return task.task_id

    @admin.display(description="worker", ordering="worker")
    def worker_link(self, task: Task) -> str:
        if task.worker_id is None:
            return "-"
        return _change_link(WorkerConnection, task.worker_id, f"worker #{task.worker_id}")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Task], search_term: str
    ) -> tuple[QuerySet[Task], bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        # taskIds are decimal strings on the wire; 18 digits keep within a bigint.
        if term.isdecimal() and len(term) <= 18:
            results |= queryset.filter(pk=int(term))
        return results, may_have_duplicates

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tasks come from clients

    def has_change_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        # The change permission unlocks the actions on the list; one task's
        # page is view-only, since saving its form would write back a stale
        # copy of a row the broker keeps changing.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        return False  # the purge_tasks command removes finished tasks

    @admin.action(description="Requeue the selected tasks", permissions=["change"])
    def requeue(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        """Assigned, failed and cancelled tasks go back to the queue; idle workers get them at once."""
        task_ids = list(queryset.values_list("pk", flat=True))
        count, effects = dispatch.requeue_tasks(task_ids)
        # After the commit: a worker must not be sent a task it cannot see yet.
        transaction.on_commit(lambda: events.ring_from_sync(effects))
        message = ngettext("%(count)d task went back to the queue.", "%(count)d tasks went back to the queue.", count)
        self._report(
            request,
            message % {"count": count},
            len(task_ids) - count,
            "only assigned, failed and cancelled tasks can be requeued",
        )

    @admin.action(description="Cancel the selected tasks", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        """Queued and assigned tasks end as cancelled; their clients get TASK_FAILED."""
        task_ids = list(queryset.values_list("pk", flat=True))
        effects = dispatch.cancel_tasks(task_ids)
        transaction.on_commit(lambda: events.ring_from_sync(effects))
        count = len(effects.outcomes)  # one TASK_FAILED per cancelled task
        message = ngettext("%(count)d task was cancelled.", "%(count)d tasks were cancelled.", count)
        self._report(
            request,
            message % {"count": count},
            len(task_ids) - count,
            "only queued and assigned tasks can be cancelled",
        )

    def _report(self, request: HttpRequest, done: str, skipped: int, why: str) -> None:
        if skipped:
            left = ngettext(
                "%(count)d selected task was left as it was", "%(count)d selected tasks were left as they were", skipped
            )
            self.message_user(request, f"{done} {left % {'count': skipped}}: {why}.", messages.WARNING)
        else:
            self.message_user(request, done, messages.SUCCESS)


# --- connections ------------------------------------------------------------------------


class UnsetDateFilter(admin.SimpleListFilter):
    """Rows whose ``field_name`` date is unset (still open/running) or set (closed/stopped)."""

    field_name: str
    unset_label: str
    set_label: str

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", self.unset_label), ("no", self.set_label)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("yes", "no"):
            return queryset.filter(**{f"{self.field_name}__isnull": self.value() == "yes"})
        return queryset


class LiveFilter(UnsetDateFilter):
    """Connections that are open, or closed."""

    title = "connection"
    parameter_name = "live"
    field_name = "disconnected_at"
    unset_label, set_label = "live", "disconnected"


class HeldTaskInline(ReadOnlyMixin, admin.TabularInline):
    """The tasks a worker holds right now."""

    model = Task
    fk_name = "worker"
    verbose_name = "held task"
    verbose_name_plural = "held tasks"
    fields = ("task_link", "message_id", "client_id", "attempts", "assigned_at", "lease_expires_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    @admin.display(description="taskId")
    def task_link(self, task: Task) -> str:
        return _change_link(Task, task.pk, task.task_id)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Task]:
        return super().get_queryset(request).assigned().order_by("pk")


class ConnectionAdmin(ReadOnlyAdmin):
    """What the two connection pages share."""

    role: str
    list_filter = (LiveFilter, "process")
    list_select_related = ("process",)
    search_fields = ("client_id__exact", "remote_addr", "channel_name__exact")
    ordering = ("-pk",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Connection]:
        return super().get_queryset(request).filter(role=self.role)

    @admin.display(description="live", boolean=True, ordering="disconnected_at")
    def live(self, connection: Connection) -> bool:
        return connection.disconnected_at is None

    @admin.display(description="process", ordering="process")
    def process_link(self, connection: Connection) -> str:
        return _change_link(BrokerProcess, connection.process_id, connection.process)


@admin.register(WorkerConnection)
class WorkerAdmin(ConnectionAdmin):
    """Worker connections: idle, busy or gone, and the tasks they hold."""

    role = Connection.Role.WORKER
    list_display = (
        "id",
        "status",
        "remote_addr",
        "process_link",
        "concurrency",
        "in_flight",
        "held_tasks",
        "ready_at",
        "connected_at",
        "disconnected_at",
    )
    fields = (
        "status",
        "remote_addr",
        "process_link",
        "concurrency",
        "in_flight",
        "ready_at",
        "connected_at",
        "disconnected_at",
        "channel_name",
    )
    readonly_fields = fields
    inlines = (HeldTaskInline,)

    @admin.display(description="state")
    def status(self, worker: Connection) -> str:
        if worker.disconnected_at is not None:
            return "disconnected"
        return "busy" if worker.in_flight else "idle"

    @admin.display(description="held tasks", ordering="in_flight")
    def held_tasks(self, worker: Connection) -> str:
        if not worker.in_flight:
            return "-"
        return _changelist_link(Task, worker.in_flight, worker__id__exact=worker.pk, state__exact=Task.State.ASSIGNED)


@admin.register(ClientConnection)
class ClientAdmin(ConnectionAdmin):
    """Client connections, with the unfinished tasks whose outcome they are to receive."""

    role = Connection.Role.CLIENT
    list_display = (
        "id",
        "client_id",
        "live",
        "remote_addr",
        "process_link",
        "waiting_tasks",
        "connected_at",
        "disconnected_at",
    )
    fields = (
        "client_id",
        "live",
        "remote_addr",
        "process_link",
        "waiting_tasks",
        "connected_at",
        "disconnected_at",
        "channel_name",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Connection]:
        # Only unfinished tasks are counted, which the (state, id) index finds
        # without reading the whole table.
        unfinished = (
            Task.objects.unfinished()
            .filter(reply_channel=OuterRef("channel_name"))
            .order_by()
            .values("reply_channel")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return super().get_queryset(request).annotate(unfinished_tasks=Coalesce(Subquery(unfinished), 0))

    @admin.display(description="tasks in flight", ordering="unfinished_tasks")
    def waiting_tasks(self, client: Connection) -> str:
        count = getattr(client, "unfinished_tasks", 0)
        if not count:
            return "-"
        return _changelist_link(Task, count, reply_channel=client.channel_name, state__in="queued,assigned")


# --- broker processes --------------------------------------------------------------------


class RunningFilter(UnsetDateFilter):
    """Processes that are running, or stopped (cleanly or reaped by another)."""

    title = "status"
    parameter_name = "running"
    field_name = "stopped_at"
    unset_label, set_label = "running", "stopped"


@admin.register(BrokerProcess)
class BrokerProcessAdmin(ReadOnlyAdmin):
    """Broker processes: heartbeat, whether they stopped, how many connections they hold."""

    list_display = (
        "id",
        "hostname",
        "pid",
        "running",
        "started_at",
        "heartbeat_at",
        "stopped_at",
        "live_workers",
        "live_clients",
    )
    list_filter = (RunningFilter, "hostname")
    search_fields = ("hostname", "pid__exact")
    ordering = ("-pk",)
    fields = ("hostname", "pid", "running", "started_at", "heartbeat_at", "stopped_at", "live_workers", "live_clients")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[BrokerProcess]:
        live = Q(connections__disconnected_at__isnull=True)
        return (
            super()
            .get_queryset(request)
            .annotate(
                live_worker_count=Count("connections", filter=live & Q(connections__role=Connection.Role.WORKER)),
                live_client_count=Count("connections", filter=live & Q(connections__role=Connection.Role.CLIENT)),
            )
        )

    @admin.display(description="running", boolean=True, ordering="stopped_at")
    def running(self, process: BrokerProcess) -> bool:
        return process.stopped_at is None

    @admin.display(description="live workers", ordering="live_worker_count")
    def live_workers(self, process: BrokerProcess) -> str:
        return _changelist_link(WorkerConnection, process.live_worker_count, process__id__exact=process.pk, live="yes")

    @admin.display(description="live clients", ordering="live_client_count")
    def live_clients(self, process: BrokerProcess) -> str:
        return _changelist_link(ClientConnection, process.live_client_count, process__id__exact=process.pk, live="yes")


# --- access keys -------------------------------------------------------------------------


@admin.register(AccessKey)
class AccessKeyAdmin(admin.ModelAdmin):
    """Access keys: make one (its key is shown once), change its roles and topics, revoke it."""

    list_display = ("name", "key_prefix", "roles_list", "topics_list", "active", "created_at", "last_used_at")
    list_filter = ("active", "client", "worker", "publisher", "subscriber")
    search_fields = ("name", "prefix")
    ordering = ("-pk",)
    actions = ("revoke",)
    fieldsets = (
        (None, {"fields": ("name", "key_prefix", "active")}),
        ("Roles", {"fields": ("client", "worker", "publisher", "subscriber")}),
        ("Topics", {"fields": ("topics",)}),
        ("Use", {"fields": ("created_at", "last_used_at")}),
    )
    readonly_fields = ("key_prefix", "created_at", "last_used_at")

    @admin.display(description="key", ordering="prefix")
    def key_prefix(self, access_key: AccessKey) -> str:
        return f"{access_key.prefix}..." if access_key.prefix else "(made when saved, shown once)"

    @admin.display(description="roles")
    def roles_list(self, access_key: AccessKey) -> str:
        return ", ".join(sorted(access_key.roles)) or "-"

    @admin.display(description="topics")
    def topics_list(self, access_key: AccessKey) -> str:
        return ", ".join(access_key.topic_patterns) or "all"

    def get_fieldsets(self, request: HttpRequest, obj: AccessKey | None = None) -> Any:
        if obj is None:  # a new key: nothing to show about its use yet
            return [(name, options) for name, options in self.fieldsets if name != "Use"]
        return self.fieldsets

    def has_delete_permission(self, request: HttpRequest, obj: AccessKey | None = None) -> bool:
        return False  # revoke instead: the row keeps the key's history (and its prefix to recognise it)

    def save_model(self, request: HttpRequest, obj: AccessKey, form: Any, change: bool) -> None:
        if change:
            obj.save()
            # Connections using the key adopt the new roles and topics, or close if it was revoked.
            transaction.on_commit(lambda: access.announce_key_changes_from_sync([obj.pk]))
        else:
            obj._plaintext_key = access.issue_key(obj)  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: AccessKey, post_url_continue: str | None = None) -> HttpResponse:
        """Show the new key on its own page, the only time it is ever shown (it is not stored)."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Access key created",
            "access_key": obj,
            "key": obj._plaintext_key,  # type: ignore[attr-defined]
            "change_url": reverse("admin:broker_accesskey_change", args=[obj.pk]),
        }
        # The admin's views send "Cache-Control: no-store": the one copy of the key stays out of caches.
        return TemplateResponse(request, "admin/broker/accesskey/key_created.html", context)

    @admin.action(description="Revoke the selected access keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[AccessKey]) -> None:
        """Revoked keys are refused; connections using them get UNAUTHORIZED and are closed (4401)."""
        revoked = access.revoke_keys(queryset.values_list("pk", flat=True))
        transaction.on_commit(lambda: access.announce_key_changes_from_sync(revoked))
        message = ngettext("%(count)d access key was revoked.", "%(count)d access keys were revoked.", len(revoked))
        self.message_user(request, message % {"count": len(revoked)}, messages.SUCCESS)
