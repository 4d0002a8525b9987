"""Publishing over HTTP: POST /api/topics/<name>/messages, with the rules and errors of PUBLISH.

The view is async and reaches the database through ``database_sync_to_async``,
which closes the connection it used: so every test here commits for real
(``transaction=True``) instead of running inside a rolled-back transaction.
"""

from __future__ import annotations

import json

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import AsyncClient, Client

from subscriptions import topics
from subscriptions.models import EmailOutbox, Message
from tests.communicators import TIMEOUT, Peer
from turtlemq_site.asgi import application


def url(name: str) -> str:
    return f"/api/topics/{name}/messages"


def post(client: Client, name: str, body: str):
    return client.post(url(name), body, content_type="application/json")


@pytest.fixture
def topic():
    topics.create_topic("http.news", "News over HTTP")
    return "http.news"


@pytest.mark.django_db(transaction=True)
async def test_a_post_publishes_the_message_answers_201_with_its_id_and_reaches_live_subscribers():
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)  # a layer for this test's event loop
    await database_sync_to_async(topics.create_topic)("http.live")
    communicator = WebsocketCommunicator(application, "/")
    assert (await communicator.connect(TIMEOUT))[0]
    subscriber = Peer(communicator, "subscriber")
    try:
        await subscriber.send({"type": "SUBSCRIBE", "topic": "http.live"})
        await subscriber.expect("SUBSCRIBED")
        client = AsyncClient()
        for expected_id, data in [(1, "first"), (2, "second")]:
            response = await client.post(url("http.live"), {"data": data}, content_type="application/json")
            assert response.status_code == 201
            assert response.json() == {"topic": "http.live", "id": expected_id}
        assert await subscriber.recv() == {"type": "MESSAGE", "topic": "http.live", "id": 1, "data": "first"}
        assert await subscriber.recv() == {"type": "MESSAGE", "topic": "http.live", "id": 2, "data": "second"}
    finally:
        await communicator.disconnect(timeout=2)
        await database_sync_to_async(connections.close_all)()


@pytest.mark.django_db(transaction=True)
def test_a_message_published_over_http_is_emailed_like_any_other(client, topic):
    topics.resolve_subscription(topic, "reader@example.com")
    assert post(client, topic, json.dumps({"data": "by mail too"})).status_code == 201
    row = EmailOutbox.objects.get()
    assert (row.address, row.message.data, row.status) == ("reader@example.com", "by mail too", "pending")


@pytest.mark.django_db(transaction=True)
def test_publishing_to_an_unknown_topic_is_404_unknown_topic(client):
    response = post(client, "http.nowhere", json.dumps({"data": "x"}))
    assert response.status_code == 404
    assert response.json()["code"] == "UNKNOWN_TOPIC" and response.json()["message"]
    assert Message.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        ("http.news", "not json", "BAD_JSON"),
        ("http.news", "", "BAD_JSON"),
        ("http.news", '["data"]', "BAD_FRAME"),
        ("http.news", "{}", "BAD_FRAME"),
        ("http.news", '{"data": 42}', "BAD_FRAME"),
        ("http.news", '{"data": null}', "BAD_FRAME"),
        ("http.*", '{"data": "x"}', "BAD_FRAME"),
        ("http..news", '{"data": "x"}', "BAD_FRAME"),
    ],
)
def test_a_bad_body_or_name_is_400_with_the_code_publish_would_give(client, topic, name, body, code):
    response = post(client, name, body)
    assert response.status_code == 400
    assert response.json()["code"] == code and response.json()["message"]
    assert Message.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_topic_comes_from_the_path_not_the_body(client, topic):
    topics.create_topic("http.other")
    response = post(client, topic, json.dumps({"data": "x", "topic": "http.other", "type": "SUBSCRIBE"}))
    assert response.json() == {"topic": "http.news", "id": 1}
    assert list(Message.objects.values_list("topic__name", flat=True)) == ["http.news"]


@pytest.mark.django_db(transaction=True)
def test_a_body_larger_than_the_frame_limit_is_refused(client, topic, settings):
    settings.TURTLEMQ_MAX_FRAME_BYTES = 100
    assert post(client, topic, json.dumps({"data": "x" * 200})).status_code == 413
    assert post(client, topic, json.dumps({"data": "x" * 50})).status_code == 201


@pytest.mark.django_db(transaction=True)
def test_the_api_needs_no_csrf_token_and_only_accepts_post(topic):
    server_side = Client(enforce_csrf_checks=True)
    assert post(server_side, topic, json.dumps({"data": "x"})).status_code == 201
    assert server_side.get(url(topic)).status_code == 405
