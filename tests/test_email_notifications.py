"""E-mail notification, delivered to a real SMTP server (aiosmtpd) started by each test.

Publishing writes outbox rows; ``send_notifications`` (or the domain functions
it runs) delivers them. The server can refuse recipients (451, 550) to show
retries and failures.
"""

from __future__ import annotations

import re
import socket
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage as ReceivedMail
from io import StringIO

import pytest
from aiosmtpd.controller import Controller
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from subscriptions import notifications, topics
from subscriptions.models import EmailOutbox, Subscription

pytestmark = pytest.mark.django_db


class RecordingSMTPHandler:
    """An aiosmtpd handler that keeps every accepted mail and refuses recipients on demand."""

    def __init__(self) -> None:
        self.mails: list[ReceivedMail] = []
        self.refusals: list[str] = []  # replies for the next RCPT commands, used up in order

    # aiosmtpd calls these hooks by name.
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refusals:
            return self.refusals.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        mail = message_from_bytes(envelope.content, policy=policy.default)
        mail["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        self.mails.append(mail)
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def smtp(settings):
    """A real SMTP server on a free port, and the settings that send mail to it."""
    handler = RecordingSMTPHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = controller.port
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_TIMEOUT = 10
    settings.DEFAULT_FROM_EMAIL = "TurtleMQ <notify@turtlemq.test>"
    settings.TURTLEMQ_PUBLIC_URL = "https://mq.example.org"
    settings.TURTLEMQ_EMAIL_RETRY_BACKOFF = 60.0
    settings.TURTLEMQ_EMAIL_MAX_ATTEMPTS = 3
    yield handler
    controller.stop()


@pytest.fixture
def topic():
    topics.create_topic("mail.news", "News by mail")
    return "mail.news"


def subscribe(topic_name: str, address: str) -> Subscription:
    topics.resolve_subscription(topic_name, address)
    return Subscription.objects.get(topic__name=topic_name, address=address)


def send_notifications(*args: str) -> str:
    out = StringIO()
    call_command("send_notifications", "--once", *args, stdout=out)
    return out.getvalue()


def body_of(mail: ReceivedMail) -> str:
    return mail.get_body(preferencelist=("plain",)).get_content()


# --- the outbox ---------------------------------------------------------------------------


def test_publishing_writes_one_pending_outbox_row_per_active_email_subscription(topic):
    subscribe(topic, "a@example.com")
    subscribe(topic, "b@example.com")
    gone = subscribe(topic, "gone@example.com")
    topics.unsubscribe_by_token(gone.token)
    published = topics.publish(topic, "hello")
    assert published.emails == 2
    rows = EmailOutbox.objects.order_by("address")
    assert [(row.address, row.status, row.attempts) for row in rows] == [
        ("a@example.com", "pending", 0),
        ("b@example.com", "pending", 0),
    ]
    assert all(row.message.seq == published.seq for row in rows)


def test_publishing_never_waits_for_smtp_even_when_no_server_answers(topic, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens there
    subscribe(topic, "a@example.com")
    assert topics.publish(topic, "hello").seq == 1
    assert EmailOutbox.objects.get().status == "pending"


# --- delivery -------------------------------------------------------------------------------


def test_send_notifications_delivers_one_email_per_message_and_address_with_the_content(smtp, topic):
    subscribe(topic, "a@example.com")
    subscribe(topic, "b@example.com")
    topics.publish(topic, "first news")
    topics.publish(topic, "second news")
    assert send_notifications() == "sent 4, will retry 0, failed 0\n"
    assert sorted((m["X-Envelope-To"], m["Subject"]) for m in smtp.mails) == [
        ("a@example.com", "[mail.news] New message #1"),
        ("a@example.com", "[mail.news] New message #2"),
        ("b@example.com", "[mail.news] New message #1"),
        ("b@example.com", "[mail.news] New message #2"),
    ]
    mail = next(m for m in smtp.mails if m["To"] == "a@example.com" and m["Subject"].endswith("#2"))
    assert mail["From"] == "TurtleMQ <notify@turtlemq.test>"
    body = body_of(mail)
    assert 'topic "mail.news"' in body
    assert "second news" in body and "first news" not in body
    assert all(row.status == "sent" and row.sent_at and row.attempts == 1 for row in EmailOutbox.objects.all())
    assert send_notifications() == "sent 0, will retry 0, failed 0\n"  # nothing is sent twice
    assert len(smtp.mails) == 4


def test_every_email_carries_one_click_unsubscribe_headers_and_its_own_stable_message_id(smtp, topic):
    subscription = subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    send_notifications()
    [mail] = smtp.mails
    link = f"https://mq.example.org/unsubscribe/{subscription.token}"
    # A long header may be folded before its value; unfolding leaves a space.
    assert mail["List-Unsubscribe"].strip() == f"<{link}>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert link in body_of(mail)
    assert mail["Message-ID"] == EmailOutbox.objects.get().message_id_header


def test_the_link_in_the_email_asks_for_confirmation_on_get_and_unsubscribes_on_post(smtp, topic):
    subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    send_notifications()
    path = re.search(r"https://mq\.example\.org(/unsubscribe/\S+)", body_of(smtp.mails[0])).group(1)
    browser = Client()
    page = browser.get(path)
    assert page.status_code == 200
    assert b"<form" in page.content and b'method="post"' in page.content and b"mail.news" in page.content
    assert Subscription.objects.get().active  # a GET (a link scanner, say) changes nothing
    done = browser.post(path)
    assert done.status_code == 200 and b"Unsubscribed" in done.content
    assert not Subscription.objects.get().active
    topics.publish(topic, "after unsubscribing")
    assert send_notifications() == "sent 0, will retry 0, failed 0\n"
    assert len(smtp.mails) == 1
    assert b"Already unsubscribed" in browser.get(path).content


def test_a_one_click_post_from_a_mail_client_needs_no_csrf_token(topic):
    subscription = subscribe(topic, "a@example.com")
    mail_client = Client(enforce_csrf_checks=True)
    response = mail_client.post(
        f"/unsubscribe/{subscription.token}",
        "List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 200
    assert not Subscription.objects.get().active


def test_an_unknown_unsubscribe_token_is_not_found(topic):
    subscribe(topic, "a@example.com")
    assert Client().get("/unsubscribe/not-a-token").status_code == 404
    assert Client().post("/unsubscribe/not-a-token").status_code == 404
    assert Subscription.objects.get().active


def test_unsubscribing_cancels_the_emails_not_sent_yet(smtp, topic):
    subscription = subscribe(topic, "a@example.com")
    subscribe(topic, "b@example.com")
    topics.publish(topic, "hello")
    Client().post(f"/unsubscribe/{subscription.token}")
    assert send_notifications() == "sent 1, will retry 0, failed 0\n"
    assert [m["To"] for m in smtp.mails] == ["b@example.com"]
    assert EmailOutbox.objects.get(address="a@example.com").status == "cancelled"


# --- failures and retries ---------------------------------------------------------------------


def test_an_email_the_server_refuses_for_now_is_retried_after_a_backoff(smtp, topic):
    subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    smtp.refusals.append("451 4.3.0 Mailbox busy, try again later")
    before = timezone.now()
    assert send_notifications() == "sent 0, will retry 1, failed 0\n"
    row = EmailOutbox.objects.get()
    assert (row.status, row.attempts) == ("pending", 1)
    assert "451" in row.last_error and "try again later" in row.last_error
    assert before + timedelta(seconds=59) < row.next_try_at < timezone.now() + timedelta(seconds=61)
    assert send_notifications() == "sent 0, will retry 0, failed 0\n"  # not due yet
    assert notifications.retry_now([row.pk]) == 1  # the admin's "retry now"
    assert send_notifications() == "sent 1, will retry 0, failed 0\n"
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("sent", 2)
    assert [m["To"] for m in smtp.mails] == ["a@example.com"]


def test_the_retry_delay_doubles_with_each_failure(settings, topic):
    settings.TURTLEMQ_EMAIL_RETRY_BACKOFF, settings.TURTLEMQ_EMAIL_MAX_ATTEMPTS = 10.0, 5
    subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    delays = []
    for day in range(1, 5):
        now = timezone.now() + timedelta(days=day)  # the previous retry is due by then
        [claimed] = notifications.claim(now=now)
        assert notifications.mark_failed(claimed, "SMTPServerDisconnected", now=now) == "pending"
        delays.append((EmailOutbox.objects.get().next_try_at - now).total_seconds())
    assert delays == [10.0, 20.0, 40.0, 80.0]


def test_an_email_that_keeps_failing_fails_for_good_after_the_attempt_limit_with_its_error(settings, topic):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens there
    settings.TURTLEMQ_EMAIL_MAX_ATTEMPTS = 3
    subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    row = EmailOutbox.objects.get()
    for attempt, outcome in [(1, "will retry 1"), (2, "will retry 1"), (3, "failed 1")]:
        notifications.retry_now([row.pk])
        assert outcome in send_notifications()
        row.refresh_from_db()
        assert row.attempts == attempt
        assert "ConnectionRefusedError" in row.last_error
    assert row.status == "failed"
    assert send_notifications() == "sent 0, will retry 0, failed 0\n"  # failed rows stay failed


def test_a_permanent_refusal_fails_the_email_at_once(smtp, topic):
    subscribe(topic, "nobody@example.com")
    subscribe(topic, "b@example.com")
    topics.publish(topic, "hello")
    smtp.refusals.append("550 5.1.1 No such user")
    assert send_notifications() == "sent 1, will retry 0, failed 1\n"
    failed = EmailOutbox.objects.get(status="failed")
    assert failed.attempts == 1 and "550" in failed.last_error and "No such user" in failed.last_error
    assert EmailOutbox.objects.get(status="sent").address != failed.address


# --- claims and leases ----------------------------------------------------------------------------


def test_a_claimed_email_is_not_claimed_again_while_its_lease_lasts(topic):
    subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    assert len(notifications.claim(lease=30)) == 1
    assert notifications.claim() == []
    assert notifications.claim(now=timezone.now() + timedelta(seconds=20)) == []
    row = EmailOutbox.objects.get()
    assert (row.status, row.attempts) == ("sending", 1)


def test_a_sender_that_died_between_sending_and_marking_is_replaced_and_the_resent_mail_has_the_same_message_id(
    smtp, topic
):
    subscribe(topic, "a@example.com")
    topics.publish(topic, "hello")
    [claimed] = notifications.claim(lease=30)
    notifications.build_email(claimed).send()  # the SMTP server accepted it; then the sender died
    assert notifications.claim() == []  # its lease still holds the row
    later = timezone.now() + timedelta(seconds=31)
    [again] = notifications.claim(now=later)
    assert (again.id, again.attempts) == (claimed.id, 2)
    # Were the first sender only slow, not dead, its claim would count for nothing now.
    assert notifications.mark_sent(claimed) is False
    assert notifications.mark_failed(claimed, "late") is None
    assert notifications.deliver([again]).sent == 1
    assert len(smtp.mails) == 2
    assert smtp.mails[0]["Message-ID"] == smtp.mails[1]["Message-ID"] == claimed.message_id_header
    row = EmailOutbox.objects.get()
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, "")


def test_send_notifications_refuses_a_batch_below_one():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("send_notifications", "--once", "--batch", "0")
