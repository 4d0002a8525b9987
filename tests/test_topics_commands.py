"""Management commands of topics: create_topic and purge_messages."""

from __future__ import annotations

from io import StringIO

import pytest
from asgiref.sync import sync_to_async
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from subscriptions import events, topics
from subscriptions.models import EmailOutbox, Message, Topic
from tests.communicators import TIMEOUT, Peer
from turtlemq_site.asgi import application


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# --- create_topic -------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_topic_creates_a_topic_with_its_description():
    assert run("create_topic", "news.sports", "--description", "All about sports") == "Created topic news.sports\n"
    topic = Topic.objects.get(name="news.sports")
    assert topic.description == "All about sports"
    assert topics.list_topic_names().count("news.sports") == 1


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["news..sports", "news.*", "news sports", "#", ""])
def test_create_topic_refuses_a_name_that_is_not_dot_separated_words(name):
    with pytest.raises(CommandError, match=r"dot-separated words|cannot be blank"):
        run("create_topic", name)
    assert not Topic.objects.filter(name=name).exists()


@pytest.mark.django_db
def test_create_topic_refuses_a_name_that_is_taken():
    run("create_topic", "taken")
    with pytest.raises(CommandError, match="already exists"):
        run("create_topic", "taken", "--description", "again")
    assert Topic.objects.get(name="taken").description == ""


@pytest.mark.django_db(transaction=True)
async def test_a_topic_created_by_the_command_reaches_connections_following_a_matching_pattern():
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)  # a layer for this test's event loop
    communicator = WebsocketCommunicator(application, "/")
    assert (await communicator.connect(TIMEOUT))[0]
    subscriber = Peer(communicator, "subscriber")
    try:
        await subscriber.send({"type": "SUBSCRIBE", "topic": "cmd.#"})
        await subscriber.expect("SUBSCRIBED")
        await sync_to_async(run)("create_topic", "cmd.fresh")
        await events.announce_message(await database_sync_to_async(topics.publish)("cmd.fresh", "first"))
        assert await subscriber.recv() == {"type": "MESSAGE", "topic": "cmd.fresh", "id": 1, "data": "first"}
    finally:
        await communicator.disconnect(timeout=2)
        await database_sync_to_async(connections.close_all)()


# --- purge_messages ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_purge_messages_keeps_the_newest_messages_of_each_topic():
    topics.create_topic("purge.long", "Long")
    topics.create_topic("purge.short", "Short")
    for i in range(1, 6):
        topics.publish("purge.long", f"long {i}")
    topics.publish("purge.short", "short 1")
    assert run("purge_messages", "--keep", "2") == "Deleted 3 messages\n"
    assert list(Message.objects.filter(topic__name="purge.long").values_list("seq", "data")) == [
        (4, "long 4"),
        (5, "long 5"),
    ]
    assert Message.objects.filter(topic__name="purge.short").count() == 1
    # Sequence numbers go on from where they were; the content shows what is left.
    assert topics.publish("purge.long", "long 6").seq == 6
    assert topics.topic_content(Topic.objects.get(name="purge.long")) == "Long\nlong 4\nlong 5\nlong 6"


@pytest.mark.django_db
def test_purge_messages_keeps_messages_whose_emails_are_not_sent_yet():
    topics.create_topic("purge.mail")
    topics.publish("purge.mail", "before anyone subscribed")
    topics.resolve_subscription("purge.mail", "reader@example.com")
    topics.publish("purge.mail", "waiting for its e-mail")
    topics.publish("purge.mail", "newest")
    EmailOutbox.objects.filter(message__data="newest").update(status=EmailOutbox.Status.SENT)
    assert run("purge_messages", "--keep", "0") == "Deleted 2 messages\n"
    assert list(Message.objects.values_list("data", flat=True)) == ["waiting for its e-mail"]


@pytest.mark.django_db
def test_purge_messages_needs_a_number_to_keep_of_zero_or_more():
    with pytest.raises(CommandError):
        run("purge_messages", "--keep", "-1")
    with pytest.raises(CommandError):
        run("purge_messages")
