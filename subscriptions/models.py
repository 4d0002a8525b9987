"""Tables of topics: topics, their messages, e-mail subscriptions and the e-mail outbox.

The database is the truth for topics as for tasks: a message is stored before
anyone hears of it, and the e-mails it causes are outbox rows written in the
same transaction. The domain layer that changes these rows is
``subscriptions.topics`` (topics, messages, subscriptions) and
``subscriptions.notifications`` (the outbox).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from urllib.parse import urlsplit

from django.conf import settings
from django.db import models
from django.db.models import Q

from .names import MAX_NAME_LENGTH, validate_topic_name


def new_unsubscribe_token() -> str:
    """A fresh, unguessable token for an unsubscribe link."""
    return secrets.token_urlsafe(32)


def new_message_id() -> str:
    """A fresh ``Message-ID`` header value, in the domain of the public URL."""
    domain = urlsplit(settings.TURTLEMQ_PUBLIC_URL).hostname or "turtlemq.localhost"
    return f"<{uuid.uuid4().hex}@{domain}>"


class Topic(models.Model):
    """A named stream of messages that peers publish to and subscribe to."""

    name = models.CharField(max_length=MAX_NAME_LENGTH, unique=True, validators=[validate_topic_name])
    description = models.TextField(blank=True, default="", help_text="The first line of the topic's content.")
    # The sequence number of the newest message. Publishing increments it
    # under the row's lock, which numbers each topic's messages 1, 2, 3, ...
    # in commit order.
    last_message_id = models.PositiveBigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class MessageQuerySet(models.QuerySet["Message"]):
    def of_topic(self, topic_id: int) -> MessageQuerySet:
        return self.filter(topic_id=topic_id)

    def after(self, seq: int) -> MessageQuerySet:
        """Messages with a sequence number above ``seq``, oldest first."""
        return self.filter(seq__gt=seq).order_by("seq")

    def newest_first(self) -> MessageQuerySet:
        return self.order_by("-seq")


class Message(models.Model):
    """One message published to a topic; ``seq`` is its ``id`` on the wire."""

    topic = models.ForeignKey(Topic, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField(help_text="The message's sequence number in its topic.")
    data = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["topic", "seq"]
        constraints = [models.UniqueConstraint(fields=["topic", "seq"], name="message_unique_seq_per_topic")]

    def __str__(self) -> str:
        return f"{self.topic_id}#{self.seq}"


class SubscriptionQuerySet(models.QuerySet["Subscription"]):
    def active(self) -> SubscriptionQuerySet:
        return self.filter(active=True)


class Subscription(models.Model):
    """An e-mail address that receives one e-mail per message of a topic."""

    topic = models.ForeignKey(Topic, on_delete=models.CASCADE, related_name="subscriptions")
    address = models.EmailField(max_length=254)
    active = models.BooleanField(default=True, help_text="Inactive subscriptions receive no e-mail.")
    token = models.CharField(max_length=64, unique=True, default=new_unsubscribe_token, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    unsubscribed_at = models.DateTimeField(null=True, blank=True)

    objects = SubscriptionQuerySet.as_manager()

    class Meta:
        ordering = ["topic", "address"]
        constraints = [
            models.UniqueConstraint(fields=["topic", "address"], name="subscription_unique_address_per_topic")
        ]

    def __str__(self) -> str:
        return f"{self.address} on {self.topic}"


class EmailOutboxQuerySet(models.QuerySet["EmailOutbox"]):
    def claimable(self, now: datetime) -> EmailOutboxQuerySet:
        """Rows a sender may take: pending and due, or claimed by a sender whose lease ran out."""
        return self.filter(
            Q(status=EmailOutbox.Status.PENDING, next_try_at__lte=now)
            | Q(status=EmailOutbox.Status.SENDING, claimed_until__lt=now)
        )

    def unsent(self) -> EmailOutboxQuerySet:
        return self.filter(status__in=(EmailOutbox.Status.PENDING, EmailOutbox.Status.SENDING))


class EmailOutbox(models.Model):
    """One e-mail to send: a message of a topic for one subscribed address.

    States, and who moves a row between them (``subscriptions.notifications``)::

        PENDING ──claim──> SENDING ──mark_sent──> SENT
           ^                  │
           └── mark_failed ───┤ (attempts left, after backoff)
               (retry_now)    └── mark_failed, no attempts left ──> FAILED ──retry_now──> PENDING
        PENDING ── the address unsubscribed ──> CANCELLED

    A SENDING row whose lease (``claimed_until``) ran out is claimable again:
    its sender died. It is re-sent with the same ``message_id_header``.
    """

    class Status(models.TextChoices):
        PENDING = "pending"  # waiting to be sent (first time or after a failure's backoff)
        SENDING = "sending"  # claimed by a sender until claimed_until
        SENT = "sent"  # the SMTP server accepted it
        FAILED = "failed"  # gave up after the attempt limit; last_error says why
        CANCELLED = "cancelled"  # the address unsubscribed before it was sent

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="outbox")
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="outbox")
    address = models.EmailField(max_length=254, help_text="The recipient when the row was written.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="How often a sender claimed the row.")
    last_error = models.TextField(blank=True, default="")
    next_try_at = models.DateTimeField(help_text="A pending row is not sent before this time.")
    claimed_until = models.DateTimeField(null=True, blank=True, help_text="Lease of the sender that claimed it.")
    sent_at = models.DateTimeField(null=True, blank=True)
    # The same on every attempt, so that a mail re-sent after a sender died
    # between sending and marking is recognisably the same mail.
    message_id_header = models.CharField(
        "Message-ID", max_length=255, unique=True, default=new_message_id, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = EmailOutboxQuerySet.as_manager()

    class Meta:
        verbose_name = "e-mail outbox row"
        verbose_name_plural = "e-mail outbox"
        indexes = [models.Index(fields=["status", "next_try_at"], name="outbox_due_idx")]
        constraints = [
            models.UniqueConstraint(fields=["message", "subscription"], name="outbox_unique_message_per_recipient")
        ]

    def __str__(self) -> str:
        return f"{self.message} to {self.address} ({self.status})"
