"""The admin pages of topics, subscriptions, messages and the e-mail outbox."""

from __future__ import annotations

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connections
from django.test import AsyncClient
from django.urls import reverse
from django.utils import timezone

from subscriptions import topics
from subscriptions.models import EmailOutbox, Message, Subscription, Topic
from tests.communicators import TIMEOUT, Peer
from turtlemq_site.asgi import application

CHANGELIST = {
    model: reverse(f"admin:subscriptions_{model}_changelist")
    for model in ("topic", "message", "subscription", "emailoutbox")
}


@pytest.fixture
def operator(client, django_user_model):
    user = django_user_model.objects.create_superuser("operator", "operator@example.com", "secret")
    client.force_login(user)
    return client


@pytest.fixture
def news():
    topics.create_topic("admin.news", "News for operators")
    topics.resolve_subscription("admin.news", "reader@example.com")
    topics.resolve_subscription("admin.news", "other@example.com")
    topics.publish("admin.news", "one")
    topics.publish("admin.news", "two")
    return Topic.objects.get(name="admin.news")


# --- topics --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_topic_list_shows_each_topics_message_and_subscriber_counts(operator, news):
    topics.unsubscribe_subscriptions([Subscription.objects.get(address="other@example.com").pk])
    page = operator.get(CHANGELIST["topic"], {"q": "admin.news"})
    assert page.status_code == 200
    row = page.context["cl"].result_list.get(name="admin.news")
    assert (row.message_count, row.subscriber_count, row.last_message_id) == (2, 1, 2)
    assert b"News for operators" in page.content


@pytest.mark.django_db
def test_a_topics_page_shows_its_email_subscriptions_inline_and_keeps_its_name(operator, news):
    page = operator.get(reverse("admin:subscriptions_topic_change", args=[news.pk]))
    assert page.status_code == 200
    assert b"reader@example.com" in page.content and b"other@example.com" in page.content
    assert b'name="name"' not in page.content  # read-only once created


@pytest.mark.django_db
def test_a_topic_added_in_the_admin_must_have_a_valid_name(operator):
    add = reverse("admin:subscriptions_topic_add")
    form = {
        "description": "d",
        "subscriptions-TOTAL_FORMS": "0",
        "subscriptions-INITIAL_FORMS": "0",
    }
    assert operator.post(add, {**form, "name": "bad..name"}).status_code == 200  # the form again, with errors
    assert not Topic.objects.filter(name="bad..name").exists()
    assert operator.post(add, {**form, "name": "good.name"}).status_code == 302
    assert Topic.objects.get(name="good.name").description == "d"


@pytest.mark.django_db
def test_the_publish_action_first_asks_for_the_message(operator, news):
    page = operator.post(CHANGELIST["topic"], {"action": "publish_message", "_selected_action": [news.pk]})
    assert page.status_code == 200
    assert b"Publish a message" in page.content and b"<textarea" in page.content and b"admin.news" in page.content
    assert Message.objects.filter(topic=news).count() == 2


@pytest.mark.django_db(transaction=True)
async def test_the_publish_action_stores_the_message_emails_it_and_sends_it_to_live_subscribers(news):
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)  # a layer for this test's event loop
    user = await database_sync_to_async(get_user_model().objects.create_superuser)("op", "op@example.com", "pw")
    browser = AsyncClient()
    await browser.aforce_login(user)
    communicator = WebsocketCommunicator(application, "/")
    assert (await communicator.connect(TIMEOUT))[0]
    subscriber = Peer(communicator, "subscriber")
    try:
        await subscriber.send({"type": "SUBSCRIBE", "topic": "admin.*"})
        await subscriber.expect("SUBSCRIBED")
        response = await browser.post(
            CHANGELIST["topic"],
            {"action": "publish_message", "_selected_action": [news.pk], "apply": "Publish", "data": "from the admin"},
        )
        assert response.status_code == 302
        assert await subscriber.recv() == {"type": "MESSAGE", "topic": "admin.news", "id": 3, "data": "from the admin"}
        emails = await database_sync_to_async(
            lambda: sorted(EmailOutbox.objects.filter(message__seq=3).values_list("address", flat=True))
        )()
        assert emails == ["other@example.com", "reader@example.com"]
    finally:
        await communicator.disconnect(timeout=2)
        await database_sync_to_async(connections.close_all)()


# --- subscriptions, messages, outbox -----------------------------------------------------------


@pytest.mark.django_db
def test_subscriptions_are_searched_by_address_and_filtered_by_topic_and_active(operator, news):
    topics.create_topic("admin.other")
    topics.resolve_subscription("admin.other", "reader@example.com")
    topics.unsubscribe_subscriptions([Subscription.objects.get(topic=news, address="other@example.com").pk])

    def listed(**params: object) -> list[tuple[str, str]]:
        page = operator.get(CHANGELIST["subscription"], params)
        assert page.status_code == 200
        return sorted((s.topic.name, s.address) for s in page.context["cl"].result_list)

    assert listed(q="reader") == [("admin.news", "reader@example.com"), ("admin.other", "reader@example.com")]
    assert listed(topic__id__exact=news.pk) == [
        ("admin.news", "other@example.com"),
        ("admin.news", "reader@example.com"),
    ]
    assert listed(active__exact=0) == [("admin.news", "other@example.com")]


@pytest.mark.django_db
def test_the_unsubscribe_action_ends_subscriptions_and_cancels_their_unsent_emails(operator, news):
    reader = Subscription.objects.get(address="reader@example.com")
    response = operator.post(CHANGELIST["subscription"], {"action": "unsubscribe", "_selected_action": [reader.pk]})
    assert response.status_code == 302
    reader.refresh_from_db()
    assert not reader.active and reader.unsubscribed_at
    assert set(EmailOutbox.objects.filter(subscription=reader).values_list("status", flat=True)) == {"cancelled"}
    assert set(EmailOutbox.objects.exclude(subscription=reader).values_list("status", flat=True)) == {"pending"}


@pytest.mark.django_db
def test_messages_are_listed_by_topic_and_cannot_be_added_or_edited(operator, news):
    page = operator.get(CHANGELIST["message"], {"topic__id__exact": news.pk})
    assert sorted(m.seq for m in page.context["cl"].result_list) == [1, 2]
    assert operator.get(reverse("admin:subscriptions_message_add")).status_code == 403


@pytest.mark.django_db
def test_the_outbox_is_filtered_by_status_and_retry_now_makes_failed_emails_due(operator, news):
    failed = EmailOutbox.objects.filter(address="reader@example.com").first()
    EmailOutbox.objects.filter(pk=failed.pk).update(status="failed", attempts=6, last_error="550 no such user")
    page = operator.get(CHANGELIST["emailoutbox"], {"status__exact": "failed"})
    assert [row.pk for row in page.context["cl"].result_list] == [failed.pk]
    assert b"550 no such user" in page.content
    response = operator.post(CHANGELIST["emailoutbox"], {"action": "retry_now", "_selected_action": [failed.pk]})
    assert response.status_code == 302
    failed.refresh_from_db()
    assert failed.status == "pending" and failed.next_try_at <= timezone.now()
