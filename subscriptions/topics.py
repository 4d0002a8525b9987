"""Topics, their messages and e-mail subscriptions: every change made to them.

Every public function here is synchronous and runs in a transaction (or is a
single consistent read); consumers call them through
``database_sync_to_async``, the admin, the HTTP API and the management
commands call them directly. Functions that produce something others must hear
of return it (:class:`Published`, :class:`TopicRef`); the caller announces it
over the channel layer after the commit (``subscriptions.events``).

Sequence numbers: ``publish`` increments ``Topic.last_message_id`` with an
UPDATE, which holds the topic row's lock (PostgreSQL) or the database's write
lock (SQLite, IMMEDIATE transactions) until the commit. So a topic's messages
are numbered 1, 2, 3, ... in commit order, and once message N is visible,
every message before it is visible too: a reader that sees a gap in the live
stream can always fill it from the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from broker.protocol import ErrorCode, ProtocolError
from broker.sql import Runner

from . import sql
from .models import EmailOutbox, Message, Subscription, Topic
from .names import has_wildcards, matches


class UnknownTopic(ProtocolError):
    """An exact topic name that no topic has."""

    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_TOPIC, f"there is no topic {name[:64]!r}")
        self.name = name


class TopicExists(Exception):
    """``create_topic`` with a name that is taken."""


@dataclass(frozen=True, slots=True)
class TopicRef:
    """A topic as the channel layer knows it: its group is named from ``id``."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Published:
    """A message committed to a topic, to be announced to the topic's group."""

    topic_id: int
    topic: str
    seq: int
    data: str
    emails: int  # outbox rows written for it


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    data: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where each topic's stream stands right now, and one topic's content."""

    last_ids: dict[int, int]  # topic id -> its newest message's sequence number
    content: str | None  # the content of the topic asked for, if any
    content_last_id: int | None  # the newest message in that content (where the topic stood)


# --- topics ----------------------------------------------------------------------


def list_topic_names() -> list[str]:
    """Every topic's name, sorted by code point (the same on every database)."""
    return sorted(Topic.objects.values_list("name", flat=True))


def create_topic(name: str, description: str = "") -> TopicRef:
    """Create a topic; raises ``ValidationError`` for a bad name, :class:`TopicExists` for a taken one.

    The caller announces the new topic (``events.announce_topic_created``) so
    that connections following a matching pattern join it.
    """
    topic = Topic(name=name, description=description)
    topic.full_clean(validate_unique=False)
    try:
        with transaction.atomic():
            topic.save()
    except IntegrityError:
        raise TopicExists(f"a topic named {name!r} already exists") from None
    return TopicRef(topic.pk, topic.name)


def topic_content(topic: Topic, upto: int | None = None) -> str:
    """The topic's content: its description, then its newest messages (up to the configured number), one a line."""
    newest = Message.objects.of_topic(topic.pk).newest_first()
    if upto is not None:
        newest = newest.filter(seq__lte=upto)
    count = settings.TURTLEMQ_TOPIC_CONTENT_MESSAGES
    lines = list(newest.values_list("data", flat=True)[:count]) if count > 0 else []
    lines.reverse()
    return "\n".join([topic.description, *lines])


# --- publishing --------------------------------------------------------------------


def publish(name: str, data: str) -> Published:
    """Store a message on topic ``name`` with the next sequence number, and its e-mails, in one transaction.

    Raises :class:`UnknownTopic`. Never waits for SMTP: e-mails are outbox rows
    that ``send_notifications`` delivers.
    """
    (published,) = publish_many([(name, data)])
    if isinstance(published, UnknownTopic):
        raise published
    return published


# Messages per INSERT statement.
MESSAGES_PER_STATEMENT = 100


def publish_many(messages: Sequence[tuple[str, str]]) -> list[Published | UnknownTopic]:
    """Store several (topic name, data) messages in one transaction, each as :func:`publish` would.

    For each, its :class:`Published` or the :class:`UnknownTopic` it was
    refused with, in order. The messages of one topic are numbered in the
    order given, with a few statements per topic: count the topic up by their
    number, insert them, find the e-mail subscribers once.
    """
    now = timezone.now()
    results: list[Published | UnknownTopic | None] = [None] * len(messages)
    positions: dict[str, list[int]] = {}
    for position, (name, _) in enumerate(messages):
        positions.setdefault(name, []).append(position)
    with transaction.atomic():
        run = Runner()
        for name, mine in positions.items():
            counted = sql.count_up(run, name, len(mine))
            if counted is None:
                for position in mine:
                    results[position] = UnknownTopic(name)
                continue
            topic_id, last = counted
            first = last - len(mine) + 1
            ids: dict[int, int] = {}
            for start in range(0, len(mine), MESSAGES_PER_STATEMENT):
                chunk = mine[start : start + MESSAGES_PER_STATEMENT]
                ids |= sql.insert_messages(run, topic_id, first + start, [messages[p][1] for p in chunk], now)
            recipients = sql.email_recipients(run, topic_id)
            if recipients:
                EmailOutbox.objects.bulk_create(
                    EmailOutbox(message_id=message_id, subscription_id=pk, address=address, next_try_at=now)
                    for _, message_id in sorted(ids.items())
                    for pk, address in recipients
                )
            for offset, position in enumerate(mine):
                results[position] = Published(topic_id, name, first + offset, messages[position][1], len(recipients))
    return [result for result in results if result is not None]


def messages_after(topic_id: int, after: int, before: int | None = None, limit: int = 500) -> list[StoredMessage]:
    """Stored messages of a topic with ``after < seq < before``, oldest first, at most ``limit``."""
    found = Message.objects.of_topic(topic_id).after(after)
    if before is not None:
        found = found.filter(seq__lt=before)
    return [StoredMessage(seq, data) for seq, data in found.values_list("seq", "data")[:limit]]


def purge_messages(keep: int) -> int:
    """Delete all but the newest ``keep`` messages of every topic; returns how many went.

    Messages with e-mails still to send are kept until those are sent.
    """
    deleted = 0
    for topic_id, last in Topic.objects.values_list("pk", "last_message_id"):
        with transaction.atomic():
            doomed = (
                Message.objects.of_topic(topic_id)
                .filter(seq__lte=last - keep)
                .exclude(outbox__status__in=(EmailOutbox.Status.PENDING, EmailOutbox.Status.SENDING))
            )
            deleted += doomed.delete()[1].get(Message._meta.label, 0)
    return deleted


# --- following topics on a connection ------------------------------------------------


def resolve_subscription(pattern: str, email: str | None = None) -> list[TopicRef]:
    """The topics ``pattern`` matches now; registers ``email`` for an exact name.

    Raises :class:`UnknownTopic` for an exact name that no topic has. An
    address that had unsubscribed is subscribed again (with its old token).
    """
    if has_wildcards(pattern):
        return [TopicRef(pk, name) for pk, name in Topic.objects.values_list("pk", "name") if matches(pattern, name)]
    with transaction.atomic():
        topic_id = Topic.objects.filter(name=pattern).values_list("pk", flat=True).first()
        if topic_id is None:
            raise UnknownTopic(pattern)
        if email is not None:
            subscription, created = Subscription.objects.get_or_create(topic_id=topic_id, address=email)
            if not created and not subscription.active:
                Subscription.objects.filter(pk=subscription.pk).update(active=True, unsubscribed_at=None)
    return [TopicRef(topic_id, pattern)]


def snapshot(topic_ids: list[int], content_of: int | None = None) -> Snapshot:
    """The newest sequence number of each topic, and the content of topic ``content_of``.

    Called after the connection joined the topics' groups: every message
    numbered above these was announced after the join and will arrive live.
    """
    wanted = set(topic_ids) | ({content_of} if content_of is not None else set())
    topics = {topic.pk: topic for topic in Topic.objects.filter(pk__in=wanted)}
    last_ids = {pk: topics[pk].last_message_id for pk in topic_ids if pk in topics}
    content = content_last_id = None
    if content_of is not None and content_of in topics:
        topic = topics[content_of]
        # Only messages up to the sequence number just read, so that content
        # and live stream neither overlap nor leave a gap.
        content, content_last_id = topic_content(topic, upto=topic.last_message_id), topic.last_message_id
    return Snapshot(last_ids, content, content_last_id)


def leave(name: str, email: str | None = None) -> None:
    """Check that topic ``name`` exists; with ``email``, end that address's e-mail subscription.

    Raises :class:`UnknownTopic`.
    """
    with transaction.atomic():
        topic_id = Topic.objects.filter(name=name).values_list("pk", flat=True).first()
        if topic_id is None:
            raise UnknownTopic(name)
        if email is not None:
            for subscription_id in Subscription.objects.filter(topic_id=topic_id, address=email).values_list(
                "pk", flat=True
            ):
                _deactivate(subscription_id)


def unsubscribe_by_token(token: str) -> Subscription | None:
    """End the e-mail subscription with this unsubscribe token; None when no subscription has it."""
    with transaction.atomic():
        subscription = Subscription.objects.select_related("topic").filter(token=token).first()
        if subscription is not None and subscription.active:
            _deactivate(subscription.pk)
            subscription.refresh_from_db()
    return subscription


def subscription_by_token(token: str) -> Subscription | None:
    return Subscription.objects.select_related("topic").filter(token=token).first()


def unsubscribe_subscriptions(subscription_ids: list[int]) -> int:
    """End these e-mail subscriptions (the admin's action); returns how many were active."""
    with transaction.atomic():
        return sum(_deactivate(pk) for pk in subscription_ids)


def _deactivate(subscription_id: int) -> bool:
    # Must run in a transaction: the subscription ends and its unsent e-mails with it.
    now = timezone.now()
    ended = Subscription.objects.filter(pk=subscription_id, active=True).update(active=False, unsubscribed_at=now)
    EmailOutbox.objects.filter(subscription_id=subscription_id, status=EmailOutbox.Status.PENDING).update(
        status=EmailOutbox.Status.CANCELLED, last_error="the address unsubscribed"
    )
    return bool(ended)
