"""The operator's view of topics in Django's admin.

Topics are created and described here; a new topic is announced to the
connections whose patterns match it. The action "Publish a message" stores a
message through the same domain function as PUBLISH (``topics.publish``),
with its e-mails, and fans it out to the live subscribers after the commit.
Messages and outbox rows belong to the broker and are read-only; an outbox
row can be retried at once. Subscriptions are searched by address, filtered
by topic and state, and ended with the same function as the unsubscribe link.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.text import Truncator
from django.utils.translation import ngettext

from . import events, notifications, topics
from .models import EmailOutbox, Message, Subscription, Topic


def _short(text: str, length: int = 60) -> str:
    return Truncator(" ".join(text.split())).chars(length)


class SubscriptionInline(admin.TabularInline):
    model = Subscription
    fields = ("address", "active", "created_at", "unsubscribed_at")
    # Ended through the "Unsubscribe" action, which also cancels unsent e-mails.
    readonly_fields = ("active", "created_at", "unsubscribed_at")
    extra = 0
    show_change_link = True


class PublishForm(forms.Form):
    data = forms.CharField(
        label="Message", widget=forms.Textarea(attrs={"rows": 6, "cols": 80}), strip=False, required=True
    )


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    """Topics with their e-mail subscriptions; publish a message to the selected topics."""

    list_display = ("name", "short_description", "message_count", "subscriber_count", "last_message_id", "updated_at")
    search_fields = ("name", "description")
    ordering = ("name",)
    inlines = (SubscriptionInline,)
    actions = ("publish_message",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Topic]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                message_count=Count("messages", distinct=True),
                subscriber_count=Count("subscriptions", filter=Q(subscriptions__active=True), distinct=True),
            )
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Topic | None = None) -> tuple[str, ...]:
        # Patterns matched the name when connections joined the topic: a
        # rename would leave them following a topic they no longer match.
        fixed = ("last_message_id", "created_at", "updated_at")
        return ("name", *fixed) if obj is not None else fixed

    @admin.display(description="description")
    def short_description(self, topic: Topic) -> str:
        return _short(topic.description)

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, topic: Topic) -> int:
        return topic.message_count  # type: ignore[attr-defined]

    @admin.display(description="e-mail subscribers", ordering="subscriber_count")
    def subscriber_count(self, topic: Topic) -> int:
        return topic.subscriber_count  # type: ignore[attr-defined]

    def save_model(self, request: HttpRequest, obj: Topic, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            created = topics.TopicRef(obj.pk, obj.name)
            # After the commit, so that the followers can read the new topic.
            transaction.on_commit(lambda: events.announce_topic_created_from_sync(created))

    @admin.action(description="Publish a message to the selected topics")
    def publish_message(self, request: HttpRequest, queryset: QuerySet[Topic]) -> TemplateResponse | None:
        """Ask for the message, then publish it as PUBLISH would: stored, e-mailed, sent to live subscribers."""
        form = PublishForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            context = {
                **self.admin_site.each_context(request),
                "title": "Publish a message",
                "opts": self.model._meta,
                "topics": queryset,
                "form": form,
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
                "media": self.media,
            }
            return TemplateResponse(request, "admin/subscriptions/topic/publish.html", context)
        published = [
            topics.publish(name, form.cleaned_data["data"]) for name in queryset.values_list("name", flat=True)
        ]
        for message in published:
            transaction.on_commit(lambda message=message: events.announce_message_from_sync(message))
        summary = ", ".join(f"{message.topic} #{message.seq}" for message in published)
        self.message_user(request, f"Published: {summary}.", messages.SUCCESS)
        return None


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    """Stored messages: read-only (they are published, not edited); old ones may be deleted."""

    list_display = ("topic", "seq", "short_data", "created_at")
    list_filter = ("topic",)
    search_fields = ("data",)
    list_select_related = ("topic",)
    ordering = ("-created_at", "-pk")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="data")
    def short_data(self, message: Message) -> str:
        return _short(message.data, 80)


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    """E-mail subscriptions: search by address, filter by topic and active; unsubscribe."""

    list_display = ("address", "topic", "active", "created_at", "unsubscribed_at")
    list_filter = ("active", "topic")
    search_fields = ("address",)
    list_select_related = ("topic",)
    actions = ("unsubscribe",)

    def get_readonly_fields(self, request: HttpRequest, obj: Subscription | None = None) -> tuple[str, ...]:
        # Ended through the "Unsubscribe" action, which also cancels unsent e-mails.
        fixed = ("token", "created_at", "unsubscribed_at")
        return ("active", *fixed) if obj is not None else fixed

    @admin.action(description="Unsubscribe the selected addresses")
    def unsubscribe(self, request: HttpRequest, queryset: QuerySet[Subscription]) -> None:
        """End the subscriptions as the unsubscribe link does: their unsent e-mails are cancelled too."""
        count = topics.unsubscribe_subscriptions(list(queryset.values_list("pk", flat=True)))
        message = ngettext("%(count)d address was unsubscribed.", "%(count)d addresses were unsubscribed.", count)
        self.message_user(request, message % {"count": count}, messages.SUCCESS)


@admin.register(EmailOutbox)
class EmailOutboxAdmin(admin.ModelAdmin):
    """The e-mail outbox: filter by status; "retry now" for pending and failed e-mails."""

    list_display = ("pk", "address", "topic", "seq", "status", "attempts", "next_try_at", "sent_at", "short_error")
    list_filter = ("status",)
    search_fields = ("address", "message_id_header")
    list_select_related = ("message__topic",)
    ordering = ("-pk",)
    actions = ("retry_now",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="topic", ordering="message__topic__name")
    def topic(self, row: EmailOutbox) -> str:
        return row.message.topic.name

    @admin.display(description="message", ordering="message__seq")
    def seq(self, row: EmailOutbox) -> int:
        return row.message.seq

    @admin.display(description="last error")
    def short_error(self, row: EmailOutbox) -> str:
        return _short(row.last_error)

    @admin.action(description="Retry now (pending and failed e-mails)")
    def retry_now(self, request: HttpRequest, queryset: QuerySet[EmailOutbox]) -> None:
        """Make the selected pending or failed e-mails due at once; a failed one gets one more attempt."""
        count = notifications.retry_now(list(queryset.values_list("pk", flat=True)))
        message = ngettext(
            "%(count)d e-mail will be sent at the next round.",
            "%(count)d e-mails will be sent at the next round.",
            count,
        )
        self.message_user(request, message % {"count": count}, messages.SUCCESS)
