"""E-mail notification: delivering the outbox through Django's e-mail backend.

``publish`` (``subscriptions.topics``) writes one ``EmailOutbox`` row per
message and active e-mail subscription in the message's own transaction; this
module, run by ``manage.py send_notifications``, delivers them. The state
machine of a row is drawn on :class:`~subscriptions.models.EmailOutbox`.

* ``claim`` takes due rows by compare-and-set on ``attempts`` (which each
  claim increments), so two senders never take one row: the second UPDATE
  finds the counter moved and changes nothing. A claim is a lease: a row whose
  sender died stays SENDING until ``claimed_until`` and is then claimable again.
* ``mark_sent`` / ``mark_failed`` are compare-and-sets too: a sender whose
  lease ran out (and whose row another sender took) changes nothing.
* A sender can die after the SMTP server accepted a mail and before
  ``mark_sent``; the row is then sent again. That cannot be prevented, only
  made harmless: every attempt of a row carries the same ``Message-ID``, so
  the recipient's system sees the same mail twice, not two mails.

Failures are retried with exponential backoff (``TURTLEMQ_EMAIL_RETRY_BACKOFF``
seconds, doubling) up to ``TURTLEMQ_EMAIL_MAX_ATTEMPTS``; a permanent refusal
(an SMTP 5xx reply) fails the row at once.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from .models import EmailOutbox

logger = logging.getLogger("turtlemq.notifications")

MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True, slots=True)
class Notification:
    """A claimed outbox row, with everything needed to write its e-mail."""

    id: int
    attempts: int  # the attempt this claim is; mark_* compare against it
    address: str
    message_id_header: str
    topic: str
    seq: int
    data: str
    unsubscribe_token: str


@dataclass(slots=True)
class DeliveryReport:
    """What one ``deliver_due`` round did."""

    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0


def unsubscribe_url(token: str) -> str:
    """The public link that ends the subscription with this token."""
    return f"{settings.TURTLEMQ_PUBLIC_URL}/unsubscribe/{token}"


def claim(limit: int = 50, now: datetime | None = None, lease: float | None = None) -> list[Notification]:
    """Claim up to ``limit`` due rows for this sender until ``now + lease``; oldest first."""
    now = now or timezone.now()
    until = now + timedelta(seconds=settings.TURTLEMQ_EMAIL_LEASE if lease is None else lease)
    claimed: list[int] = []
    with transaction.atomic():
        candidates = EmailOutbox.objects.claimable(now).order_by("next_try_at", "pk").values_list("pk", "attempts")
        for pk, attempts in candidates[:limit]:
            won = (
                EmailOutbox.objects.claimable(now)
                .filter(pk=pk, attempts=attempts)
                .update(status=EmailOutbox.Status.SENDING, attempts=attempts + 1, claimed_until=until)
            )
            if won:
                claimed.append(pk)
    rows = EmailOutbox.objects.filter(pk__in=claimed).select_related("message__topic", "subscription").order_by("pk")
    return [
        Notification(
            id=row.pk,
            attempts=row.attempts,
            address=row.address,
            message_id_header=row.message_id_header,
            topic=row.message.topic.name,
            seq=row.message.seq,
            data=row.message.data,
            unsubscribe_token=row.subscription.token,
        )
        for row in rows
    ]


def build_email(notification: Notification, connection: BaseEmailBackend | None = None) -> EmailMessage:
    """The e-mail for one notification: names the topic, carries the message and the unsubscribe link."""
    link = unsubscribe_url(notification.unsubscribe_token)
    context = {
        "topic": notification.topic,
        "seq": notification.seq,
        "data": notification.data,
        "address": notification.address,
        "unsubscribe_url": link,
    }
    subject = " ".join(render_to_string("subscriptions/email/notification_subject.txt", context).split())
    return EmailMessage(
        subject=subject,
        body=render_to_string("subscriptions/email/notification_body.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[notification.address],
        connection=connection,
        headers={
            # The same on every attempt: a re-sent mail is the same mail.
            "Message-ID": notification.message_id_header,
            # RFC 2369 and RFC 8058 one-click unsubscribe, which large mail
            # providers require of bulk senders.
            "List-Unsubscribe": f"<{link}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "Auto-Submitted": "auto-generated",
        },
    )


def mark_sent(notification: Notification, now: datetime | None = None) -> bool:
    """Record that the SMTP server accepted the mail; False if this sender's claim was lost."""
    return bool(
        EmailOutbox.objects.filter(
            pk=notification.id, status=EmailOutbox.Status.SENDING, attempts=notification.attempts
        ).update(status=EmailOutbox.Status.SENT, sent_at=now or timezone.now(), claimed_until=None)
    )


def mark_failed(
    notification: Notification, error: str, permanent: bool = False, now: datetime | None = None
) -> str | None:
    """Record a failed attempt: retry after a backoff, or FAILED for good.

    Returns the row's new status, or None if this sender's claim was lost.
    """
    now = now or timezone.now()
    if permanent or notification.attempts >= settings.TURTLEMQ_EMAIL_MAX_ATTEMPTS:
        status, next_try_at = EmailOutbox.Status.FAILED, now
    else:
        delay = settings.TURTLEMQ_EMAIL_RETRY_BACKOFF * 2 ** (notification.attempts - 1)
        status, next_try_at = EmailOutbox.Status.PENDING, now + timedelta(seconds=delay)
    changed = EmailOutbox.objects.filter(
        pk=notification.id, status=EmailOutbox.Status.SENDING, attempts=notification.attempts
    ).update(status=status, next_try_at=next_try_at, claimed_until=None, last_error=error[:MAX_ERROR_LENGTH])
    return status if changed else None


def is_permanent(exc: Exception) -> bool:
    """Whether an SMTP error is a permanent refusal (5xx), which no retry would change."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(code >= 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code >= 500
    return False


def deliver(notifications: list[Notification]) -> DeliveryReport:
    """Send claimed notifications over one SMTP connection and record each outcome."""
    report = DeliveryReport(claimed=len(notifications))
    if not notifications:
        return report
    connection = get_connection(fail_silently=False)
    try:
        for notification in notifications:
            try:
                # Opened here, not by send(): one SMTP session serves the whole batch.
                connection.open()
                build_email(notification, connection).send()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("e-mail %s to %s failed: %s", notification.id, notification.address, error)
                status = mark_failed(notification, error, permanent=is_permanent(exc))
                if status == EmailOutbox.Status.FAILED:
                    report.failed += 1
                elif status == EmailOutbox.Status.PENDING:
                    report.retrying += 1
                # The session may be unusable after an error; the next send opens a fresh one.
                with contextlib.suppress(Exception):
                    connection.close()
                continue
            if mark_sent(notification):
                report.sent += 1
            else:
                logger.warning("e-mail %s was sent after its claim ran out", notification.id)
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return report


def deliver_due(limit: int = 50) -> DeliveryReport:
    """One round of ``send_notifications``: claim due rows and deliver them."""
    return deliver(claim(limit))


def retry_now(outbox_ids: list[int]) -> int:
    """Make pending or failed rows due at once (the admin's "retry now"); returns how many."""
    with transaction.atomic():
        return EmailOutbox.objects.filter(
            pk__in=outbox_ids, status__in=(EmailOutbox.Status.PENDING, EmailOutbox.Status.FAILED)
        ).update(status=EmailOutbox.Status.PENDING, next_try_at=timezone.now(), claimed_until=None)
