"""Access control (PROTOCOL.md, "Access control"): keys, what they grant, origins, the admin and the settings.

Consumer tests talk to ``turtlemq_site.asgi.application`` in-process with
``TURTLEMQ_AUTH`` switched on by the ``auth_on`` fixture; keys are made with
the same domain function as the admin and ``create_access_key``.
"""

from __future__ import annotations

import itertools
import runpy
import uuid
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import AsyncClient, Client

from broker import access
from broker.models import AccessKey, Connection, Task
from subscriptions.models import Message, Topic
from subscriptions.names import matches
from tests.communicators import TIMEOUT, Peer, Peers
from turtlemq_site.asgi import application

SETTINGS_FILE = Path(__file__).resolve().parents[1] / "turtlemq_site" / "settings.py"
KEYS = "/admin/broker/accesskey/"


@pytest.fixture
def auth_on(settings):
    settings.TURTLEMQ_AUTH = True
    settings.TURTLEMQ_AUTH_TIMEOUT = 30.0
    return settings


@database_sync_to_async
def new_key(*roles: str, topics: tuple[str, ...] = (), name: str = "test key") -> str:
    return access.create_key(name, roles, topics)[1]


async def open_peer(peers: Peers, path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> Peer:
    """A peer whose handshake the broker accepted."""
    communicator = WebsocketCommunicator(application, path, headers=headers or [])
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected, f"the broker refused the handshake at {path}"
    peer = Peer(communicator, f"peer{len(peers.opened) + 1}")
    peers.opened.append(peer)
    return peer


async def handshake_accepted(headers: list[tuple[bytes, bytes]]) -> bool:
    communicator = WebsocketCommunicator(application, "/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    if connected:
        await communicator.disconnect()
    return connected


async def expect_unauthorized_close(peer: Peer, ref: dict[str, Any]) -> None:
    """ERROR UNAUTHORIZED (with ``ref``), then the close with 4401."""
    await peer.expect_error("UNAUTHORIZED", ref)
    assert await peer.expect_close() == 4401


@database_sync_to_async
def counts() -> tuple[int, int]:
    """(connection rows, task rows): what a refused frame must not have created."""
    return Connection.objects.count(), Task.objects.count()


def wrong_key_like(key: str) -> str:
    """A key with the same prefix (found by the look-up) but another secret."""
    return key[: access.PREFIX_LENGTH + 1] + ("A" if key[-1] != "A" else "B") * (len(key) - access.PREFIX_LENGTH - 1)


# --- keys in the database ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_is_stored_only_as_its_hash_with_a_visible_prefix():
    access_key, key = access.create_key("billing", ["client"], ["news.#"])

    assert key.startswith("tmq_") and len(key) > 50
    row = AccessKey.objects.values().get(pk=access_key.pk)
    assert key not in [str(value) for value in row.values()]
    assert row["key_hash"] == access.hash_key(key)
    assert row["prefix"] == key[: access.PREFIX_LENGTH]
    assert access.create_key("billing", ["client"])[1] != key  # every key is new


@pytest.mark.django_db
def test_authenticate_returns_the_grant_of_an_active_key():
    access_key, key = access.create_key("pipeline", ["client", "worker"], ["jobs.#", "alerts.*"])

    grant = access.authenticate(key)

    assert grant == access.Grant(access_key.pk, frozenset({"client", "worker"}), ("jobs.#", "alerts.*"))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "presented",
    ["", "tmq_", "not-a-key", "Bearer tmq_x", "tmq_" + "x" * 500],
    ids=["empty", "scheme only", "no scheme", "with scheme word", "overlong"],
)
def test_authenticate_refuses_what_is_no_key(presented):
    access.create_key("someone", ["client"])

    assert access.authenticate(presented) is None


@pytest.mark.django_db
def test_authenticate_refuses_a_wrong_secret_behind_a_real_prefix_and_a_revoked_key():
    access_key, key = access.create_key("someone", ["client"])

    assert access.authenticate(wrong_key_like(key)) is None
    assert access.revoke_keys([access_key.pk]) == [access_key.pk]
    assert access.authenticate(key) is None
    assert access.revoke_keys([access_key.pk]) == []  # already revoked


@pytest.mark.django_db
def test_keys_sharing_a_prefix_are_told_apart_by_their_hash(monkeypatch):
    monkeypatch.setattr(access.secrets, "token_hex", lambda n: "1a2b3c4d")  # a collision of the 32-bit prefix
    first, first_key = access.create_key("first", ["client"])
    second, second_key = access.create_key("second", ["worker"])
    assert first.prefix == second.prefix

    assert access.authenticate(first_key).key_id == first.pk
    assert access.authenticate(second_key).key_id == second.pk


@pytest.mark.django_db
def test_last_use_is_recorded_at_most_once_a_minute():
    access_key, key = access.create_key("someone", ["client"])
    assert access_key.last_used_at is None

    access.authenticate(key)
    first = AccessKey.objects.get(pk=access_key.pk).last_used_at
    access.authenticate(key)
    assert first is not None and AccessKey.objects.get(pk=access_key.pk).last_used_at == first

    AccessKey.objects.filter(pk=access_key.pk).update(last_used_at=first - access.LAST_USED_PRECISION * 2)
    access.authenticate(key)
    assert AccessKey.objects.get(pk=access_key.pk).last_used_at > first


@pytest.mark.django_db
def test_create_key_refuses_unknown_roles_and_bad_topic_patterns():
    with pytest.raises(ValueError, match="admin"):
        access.create_key("x", ["client", "admin"])
    with pytest.raises(ValidationError):
        access.create_key("x", ["publisher"], ["news..sports"])
    assert not AccessKey.objects.exists()


# --- what a grant allows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        ("#", "a.b", True),
        ("#", "#", True),
        ("a.#", "a.b.*", True),
        ("a.#", "a", True),
        ("a.#", "#", False),
        ("a.*", "a.b", True),
        ("a.*", "a.#", False),
        ("a.*", "a.*.c", False),
        ("a.*.c", "a.#.c", False),
        ("a.#.c", "a.*.c", True),
        ("*.#", "#.a", True),
        ("*.#", "#", True),  # a topic name has at least one word
        ("#.a", "*.a", True),
        ("#.a", "#.b", False),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("#.x.#", "*.x", True),
        ("#.x.#", "*.#", False),
    ],
)
def test_pattern_covers_names_every_topic_the_inner_pattern_matches(outer, inner, covered):
    assert access.pattern_covers(outer, inner) is covered


def test_pattern_covers_agrees_with_matching_every_short_name():
    """Exhaustive over small patterns: covered exactly when no name matches the inner pattern but not the outer."""
    tokens = ["a", "b", "*", "#"]
    patterns = [".".join(p) for n in (1, 2, 3) for p in itertools.product(tokens, repeat=n)]
    # Names of up to 5 words from a, b and a third word: longer names add nothing for 3-token patterns.
    names = [".".join(n) for k in range(1, 6) for n in itertools.product(["a", "b", "c"], repeat=k)]
    for outer, inner in itertools.product(patterns, repeat=2):
        truth = all(matches(outer, name) for name in names if matches(inner, name))
        assert access.pattern_covers(outer, inner) is truth, (outer, inner)


def test_a_grant_without_topics_allows_every_topic_and_one_with_topics_only_those():
    everything = access.Grant(1, frozenset({"publisher", "subscriber"}))
    news = access.Grant(2, frozenset({"publisher", "subscriber"}), ("news.#", "alerts"))

    assert everything.allows_topic("anything.at.all") and everything.allows_pattern("#")
    assert news.allows_topic("news.sports") and news.allows_topic("alerts")
    assert not news.allows_topic("sports") and not news.allows_topic("alerts.fire")
    assert news.allows_pattern("news.*") and news.allows_pattern("news.#")
    assert not news.allows_pattern("#") and not news.allows_pattern("*.sports")


def test_every_frame_type_of_the_protocol_has_a_documented_rule():
    from broker.consumers import PARSERS

    assert set(access.FRAME_ROLES) == set(PARSERS) - {"STATUS"}  # STATUS: any valid key


# --- presenting a key: the handshake ---------------------------------------------------------------


def scope(path_query: bytes = b"", **headers: str) -> dict[str, Any]:
    return {"query_string": path_query, "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}


def test_a_key_is_read_from_the_query_string_first_then_from_a_bearer_header():
    assert access.token_from_scope(scope(b"token=tmq_q")) == "tmq_q"
    assert access.token_from_scope(scope(b"x=1&token=tmq_q", authorization="Bearer tmq_h")) == "tmq_q"
    assert access.token_from_scope(scope(authorization="Bearer tmq_h")) == "tmq_h"
    assert access.token_from_scope(scope(authorization="bearer   tmq_h ")) == "tmq_h"
    assert access.token_from_scope(scope(authorization="Basic dXNlcjpwdw==")) is None
    assert access.token_from_scope(scope(authorization="Bearer")) is None
    assert access.token_from_scope(scope(b"token=")) is None
    assert access.token_from_scope(scope()) is None


# --- presenting a key: the consumer -----------------------------------------------------------------

pytestmark_consumer = pytest.mark.django_db(transaction=True)


@pytestmark_consumer
async def test_with_access_control_off_a_peer_needs_no_key(peers, settings):
    settings.TURTLEMQ_AUTH = False
    client = await peers.client()

    assert "idleWorkers" in await client.status()


@pytestmark_consumer
async def test_a_key_in_the_query_string_admits_the_peer(peers, auth_on):
    key = await new_key("client")
    client = await open_peer(peers, f"/?token={key}")

    await client.register_client()
    await client.submit("m1", "work")
    await client.status()  # frames are handled in order: the task was submitted before this answer
    assert await database_sync_to_async(Task.objects.filter(message_id="m1").exists)()


@pytestmark_consumer
async def test_a_key_in_an_authorization_header_admits_the_peer(peers, auth_on):
    key = await new_key("worker")
    worker = await open_peer(peers, "/ws/", headers=[(b"authorization", f"Bearer {key}".encode())])

    await worker.register_worker()


@pytestmark_consumer
async def test_a_key_in_the_first_frame_admits_the_peer_and_that_frame_is_handled(peers, auth_on):
    key = await new_key("client")
    client = await open_peer(peers)

    frame = {"type": "REGISTER_CLIENT", "data": "", "token": key}
    await client.send(frame)

    assert await client.recv() == frame  # the echo of the original protocol, token and all
    assert "idleWorkers" in await client.status()  # later frames need no token


@pytestmark_consumer
async def test_a_first_frame_without_a_key_gets_unauthorized_and_the_connection_is_closed(peers, auth_on):
    client = await open_peer(peers)

    await client.send({"type": "REGISTER_CLIENT", "data": ""})

    await expect_unauthorized_close(client, {"type": "REGISTER_CLIENT"})
    assert await counts() == (0, 0)


@pytestmark_consumer
@pytest.mark.parametrize(
    "first",
    ['{"type": "STATUS", "token": ', '["not", "an", "object"]', '{"type": "STATUS", "token": 42}'],
    ids=["not json", "not an object", "token not a string"],
)
async def test_a_first_frame_that_presents_no_readable_key_gets_unauthorized_and_a_close(peers, auth_on, first):
    client = await open_peer(peers)

    await client.send_text(first)

    await client.expect_error("UNAUTHORIZED")
    assert await client.expect_close() == 4401


@pytestmark_consumer
@pytest.mark.parametrize("where", ["query", "header", "first frame"])
async def test_a_wrong_key_gets_unauthorized_and_a_close_with_4401(peers, auth_on, where):
    wrong = wrong_key_like(await new_key("client"))
    if where == "query":
        client = await open_peer(peers, f"/?token={wrong}")
        ref: dict[str, Any] = {}  # refused at the handshake, before any frame
    elif where == "header":
        client = await open_peer(peers, headers=[(b"authorization", f"Bearer {wrong}".encode())])
        ref = {}
    else:
        client = await open_peer(peers)
        await client.send({"type": "REGISTER_CLIENT", "data": "", "token": wrong})
        ref = {"type": "REGISTER_CLIENT"}

    await expect_unauthorized_close(client, ref)
    assert await counts() == (0, 0)


@pytestmark_consumer
async def test_a_revoked_key_is_refused(peers, auth_on):
    key = await new_key("client")
    await database_sync_to_async(lambda: access.revoke_keys(AccessKey.objects.values_list("pk", flat=True)))()

    client = await open_peer(peers, f"/?token={key}")

    await expect_unauthorized_close(client, {})


@pytestmark_consumer
async def test_frames_after_the_refusal_are_ignored(peers, auth_on):
    key = await new_key("client")
    client = await open_peer(peers)
    await client.send({"type": "REGISTER_CLIENT", "data": ""})
    await client.send({"type": "REGISTER_CLIENT", "data": "", "token": key})  # too late

    await expect_unauthorized_close(client, {"type": "REGISTER_CLIENT"})
    assert await counts() == (0, 0)


@pytestmark_consumer
async def test_a_peer_that_presents_no_key_in_time_gets_unauthorized_and_a_close(peers, auth_on):
    auth_on.TURTLEMQ_AUTH_TIMEOUT = 0.2
    client = await open_peer(peers)

    await expect_unauthorized_close(client, {})


# --- what a key grants, frame by frame ----------------------------------------------------------------

DENIED = [
    # (roles of the key, the frame it may not send)
    (["worker"], {"type": "REGISTER_CLIENT", "data": ""}),
    (["worker"], {"type": "REQUEST_TASK", "messageId": "m1", "data": "d"}),
    (["client"], {"type": "REGISTER_WORKER", "data": ""}),
    (["client"], {"type": "RESPONSE_TASK", "taskId": "1", "data": "r"}),
    (["client"], {"type": "FAIL_TASK", "taskId": "1", "data": "e"}),
    (["client"], {"type": "TOUCH_TASK", "taskId": "1"}),
    (["subscriber"], {"type": "PUBLISH", "topic": "news", "data": "d"}),
    (["publisher"], {"type": "SUBSCRIBE", "topic": "news"}),
    (["publisher"], {"type": "UNSUBSCRIBE", "topic": "news"}),
    (["publisher", "client", "worker"], {"type": "LIST_TOPICS"}),
]


@pytestmark_consumer
@pytest.mark.parametrize(("roles", "frame"), DENIED, ids=[frame["type"] for _, frame in DENIED])
async def test_a_frame_beyond_the_keys_roles_is_unauthorized_and_the_connection_stays_open(
    peers, auth_on, roles, frame
):
    key = await new_key(*roles)
    peer = await open_peer(peers, f"/?token={key}")

    await peer.send(frame)

    ref = {name: frame[name] for name in ("type", "messageId", "taskId", "topic") if name in frame}
    await peer.expect_error("UNAUTHORIZED", ref)
    assert "idleWorkers" in await peer.status()  # still open, and STATUS needs only a valid key
    assert await counts() == (0, 0)  # nothing registered, nothing submitted


@pytestmark_consumer
async def test_status_needs_only_a_valid_key(peers, auth_on):
    key = await new_key("subscriber")
    peer = await open_peer(peers, f"/?token={key}")

    status = await peer.status()

    assert status["idleWorkers"] == 0 and status["queuedTasks"] == 0


@pytestmark_consumer
async def test_a_key_with_both_task_roles_may_be_a_client_on_one_connection_and_a_worker_on_another(peers, auth_on):
    key = await new_key("client", "worker")
    worker = await open_peer(peers, f"/?token={key}")
    client = await open_peer(peers, headers=[(b"authorization", f"Bearer {key}".encode())])
    await worker.register_worker()
    await client.register_client()

    await client.submit("m1", "ping")
    task = await worker.next_task()
    await worker.respond(task, "pong")

    assert await client.expect("RESPONSE_TASK") == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "pong"}


@database_sync_to_async
def make_topics(*names: str) -> None:
    for name in names:
        Topic.objects.create(name=name, description=f"about {name}")


@pytestmark_consumer
async def test_publishing_is_limited_to_the_keys_topics(peers, auth_on):
    await make_topics("news.sports", "weather")
    key = await new_key("publisher", topics=("news.#",))
    publisher = await open_peer(peers, f"/?token={key}")

    await publisher.send({"type": "PUBLISH", "topic": "news.sports", "data": "goal"})
    assert await publisher.expect("PUBLISHED") == {"type": "PUBLISHED", "topic": "news.sports", "id": 1}

    await publisher.send({"type": "PUBLISH", "topic": "weather", "data": "rain"})
    await publisher.expect_error("UNAUTHORIZED", {"type": "PUBLISH", "topic": "weather"})


@pytestmark_consumer
async def test_subscribing_is_limited_to_patterns_within_the_keys_topics(peers, auth_on):
    await make_topics("news.sports", "weather")
    key = await new_key("subscriber", topics=("news.#",))
    subscriber = await open_peer(peers, f"/?token={key}")

    for allowed in ("news.sports", "news.*", "news.#"):
        await subscriber.send({"type": "SUBSCRIBE", "topic": allowed})
        assert (await subscriber.expect("SUBSCRIBED"))["topic"] == allowed
    for denied in ("weather", "#", "*.sports"):
        await subscriber.send({"type": "SUBSCRIBE", "topic": denied})
        await subscriber.expect_error("UNAUTHORIZED", {"type": "SUBSCRIBE", "topic": denied})
    await subscriber.send({"type": "UNSUBSCRIBE", "topic": "weather", "email": "me@example.com"})
    await subscriber.expect_error("UNAUTHORIZED", {"type": "UNSUBSCRIBE", "topic": "weather"})


# --- keys that change while they are in use ------------------------------------------------------------


@database_sync_to_async
def revoke_all_named(name: str) -> list[int]:
    return access.revoke_keys(AccessKey.objects.filter(name=name).values_list("pk", flat=True))


@pytestmark_consumer
async def test_revoking_a_key_closes_the_connections_that_use_it_and_no_others(peers, auth_on):
    revoked_key = await new_key("client", name="leaked")
    other_key = await new_key("client", name="fine")
    revoked = await open_peer(peers, f"/?token={revoked_key}")
    other = await open_peer(peers, f"/?token={other_key}")
    await revoked.register_client()
    await other.register_client()

    await access.announce_key_changes(await revoke_all_named("leaked"))

    await revoked.expect_error("UNAUTHORIZED", {})
    assert await revoked.expect_close() == 4401
    assert "idleWorkers" in await other.status()


@database_sync_to_async
def take_role(name: str, role: str) -> list[int]:
    """What an operator does in the key's admin page: untick a role."""
    keys = list(AccessKey.objects.filter(name=name))
    for access_key in keys:
        setattr(access_key, role, False)
        access_key.save()
    return [access_key.pk for access_key in keys]


@pytestmark_consumer
async def test_a_connection_adopts_new_roles_of_its_key(peers, auth_on):
    key = await new_key("client", "subscriber", name="narrowed")
    peer = await open_peer(peers, f"/?token={key}")
    await peer.send({"type": "LIST_TOPICS"})
    await peer.expect("TOPICS")

    await access.announce_key_changes(await take_role("narrowed", "subscriber"))

    # The change and the next frames travel different ways: ask until the answer changes.
    for _ in range(100):
        await peer.send({"type": "LIST_TOPICS"})
        answer = await peer.recv()
        if answer["type"] == "ERROR":
            assert answer["code"] == "UNAUTHORIZED", answer
            break
        assert answer["type"] == "TOPICS", answer
    else:
        raise AssertionError("the connection kept the subscriber role its key lost")
    await peer.register_client()  # the client role stays


# --- allowed origins ----------------------------------------------------------------------------------


@pytestmark_consumer
async def test_without_allowed_origins_any_origin_is_accepted(settings):
    settings.TURTLEMQ_ALLOWED_ORIGINS = []

    assert await handshake_accepted([(b"origin", b"https://anywhere.example")])
    assert await handshake_accepted([])


@pytestmark_consumer
async def test_with_allowed_origins_another_origin_is_refused_and_no_origin_is_accepted(settings):
    settings.TURTLEMQ_ALLOWED_ORIGINS = ["https://app.example.com", "http://localhost:3000"]

    assert await handshake_accepted([(b"origin", b"https://app.example.com")])
    assert await handshake_accepted([(b"origin", b"HTTPS://App.Example.com/")])
    assert await handshake_accepted([(b"origin", b"http://localhost:3000")])
    assert not await handshake_accepted([(b"origin", b"https://evil.example")])
    assert not await handshake_accepted([(b"origin", b"http://app.example.com")])  # another scheme
    assert not await handshake_accepted([(b"origin", b"null")])
    assert await handshake_accepted([])  # a program, not a browser page: the access key decides


# --- the admin ------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["/admin/", KEYS, f"{KEYS}add/", "/admin/broker/task/"])
def test_the_admin_requires_a_staff_login(page):
    anonymous = Client()
    response = anonymous.get(page)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")

    not_staff = Client()
    not_staff.force_login(User.objects.create_user("someone", "someone@example.com", "pw"))
    response = not_staff.get(page)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


@pytest.mark.django_db
def test_the_admin_shows_a_new_key_once_and_stores_only_its_hash(admin_client):
    response = admin_client.post(
        f"{KEYS}add/",
        {"name": "reporting", "client": "on", "subscriber": "on", "topics": "reports.#\nalerts", "active": "on"},
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]  # the one copy of the key stays out of caches
    key = response.context["key"]
    assert key in response.content.decode()
    access_key = AccessKey.objects.get()
    assert (access_key.name, access_key.roles, access_key.topic_patterns) == (
        "reporting",
        frozenset({"client", "subscriber"}),
        ("reports.#", "alerts"),
    )
    assert access.authenticate(key).key_id == access_key.pk
    page = admin_client.get(f"{KEYS}{access_key.pk}/change/").content.decode()
    assert key not in page and access_key.prefix in page
    assert key not in admin_client.get(KEYS).content.decode()


@pytest.mark.django_db
def test_the_admin_refuses_a_bad_topic_pattern(admin_client):
    response = admin_client.post(f"{KEYS}add/", {"name": "x", "publisher": "on", "topics": "news..x", "active": "on"})

    assert response.status_code == 200 and "Not a topic pattern" in response.content.decode()
    assert not AccessKey.objects.exists()


@pytest.mark.django_db
def test_the_admin_revokes_keys_and_never_deletes_them(admin_client, django_capture_on_commit_callbacks):
    _, kept_key = access.create_key("kept", ["client"])
    gone, gone_key = access.create_key("gone", ["client"])

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(KEYS, {"action": "revoke", "_selected_action": [gone.pk]}, follow=True)

    assert [str(m) for m in response.context["messages"]] == ["1 access key was revoked."]
    assert access.authenticate(gone_key) is None and access.authenticate(kept_key) is not None
    assert admin_client.get(f"{KEYS}{gone.pk}/delete/").status_code == 403
    assert AccessKey.objects.count() == 2


@pytest.mark.django_db(transaction=True)
async def test_revoking_in_the_admin_closes_the_connections_using_the_key(peers, auth_on):
    key = await new_key("client", name="revoked in the admin")
    client = await open_peer(peers, f"/?token={key}")
    await client.register_client()

    @sync_to_async
    def operator_revokes() -> int:
        admin = User.objects.create_superuser(f"admin-{uuid.uuid4().hex[:8]}", "admin@example.com", "pw")
        browser = Client()
        browser.force_login(admin)
        pk = AccessKey.objects.get(name="revoked in the admin").pk
        return browser.post(KEYS, {"action": "revoke", "_selected_action": [pk]}).status_code

    assert await operator_revokes() == 302

    await client.expect_error("UNAUTHORIZED", {})
    assert await client.expect_close() == 4401


# --- the management command ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_access_key_prints_the_key_once_on_stdout():
    out, err = StringIO(), StringIO()

    call_command(
        "create_access_key", "ci", "--roles", "client,worker", "--topics", "ci.#", "builds", stdout=out, stderr=err
    )

    key = out.getvalue().strip()
    grant = access.authenticate(key)
    assert grant is not None and grant.roles == {"client", "worker"} and grant.topics == ("ci.#", "builds")
    assert key not in err.getvalue() and "shown only this once" in err.getvalue()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "arguments",
    [["--roles", "client,root"], ["--roles", " , "], ["--roles", "publisher", "--topics", "a..b"]],
    ids=["unknown role", "no role", "bad pattern"],
)
def test_create_access_key_refuses_bad_arguments(arguments):
    with pytest.raises(CommandError):
        call_command("create_access_key", "x", *arguments, stdout=StringIO(), stderr=StringIO())
    assert not AccessKey.objects.exists()


# --- the setting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "auth"),
    [
        ({}, False),  # a developer's machine: DEBUG defaults to on
        ({"DEBUG": "1"}, False),
        ({"DEBUG": "0", "SECRET_KEY": "a-production-secret"}, True),
        ({"DEBUG": "0", "SECRET_KEY": "a-production-secret", "TURTLEMQ_AUTH": "0"}, False),
        ({"DEBUG": "1", "TURTLEMQ_AUTH": "1"}, True),
    ],
)
def test_access_control_is_on_in_production_settings_and_off_in_development(monkeypatch, environment, auth):
    for name in ("DEBUG", "SECRET_KEY", "TURTLEMQ_AUTH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert runpy.run_path(str(SETTINGS_FILE))["TURTLEMQ_AUTH"] is auth


def test_allowed_origins_are_read_from_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("TURTLEMQ_ALLOWED_ORIGINS", " https://a.example, http://localhost:3000 ,")

    assert runpy.run_path(str(SETTINGS_FILE))["TURTLEMQ_ALLOWED_ORIGINS"] == [
        "https://a.example",
        "http://localhost:3000",
    ]


# --- the HTTP publish API -----------------------------------------------------------------------------------


async def http_publish(topic: str, authorization: str | None = None) -> Any:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return await AsyncClient().post(
        f"/api/topics/{topic}/messages", {"data": "hello"}, content_type="application/json", headers=headers
    )


@pytestmark_consumer
async def test_the_http_publish_api_needs_no_key_with_access_control_off(settings):
    settings.TURTLEMQ_AUTH = False
    await make_topics("weather")

    assert (await http_publish("weather")).status_code == 201


@pytestmark_consumer
@pytest.mark.parametrize(
    "authorization",
    [None, "Basic dXNlcjpwdw==", "Bearer", "Bearer tmq_00000000_wrong"],
    ids=["none", "basic", "empty bearer", "wrong key"],
)
async def test_the_http_publish_api_answers_401_without_a_valid_key(auth_on, authorization):
    await make_topics("weather")

    response = await http_publish("weather", authorization)

    assert response.status_code == 401 and response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["code"] == "UNAUTHORIZED"
    assert not await database_sync_to_async(Message.objects.exists)()


@pytestmark_consumer
async def test_the_http_publish_api_needs_the_publisher_role_and_an_allowed_topic(auth_on):
    await make_topics("news.sports", "weather")
    subscriber = await new_key("subscriber")
    publisher = await new_key("publisher", topics=("news.#",))

    denied_role = await http_publish("news.sports", f"Bearer {subscriber}")
    denied_topic = await http_publish("weather", f"Bearer {publisher}")
    allowed = await http_publish("news.sports", f"Bearer {publisher}")

    assert (denied_role.status_code, denied_role.json()["code"]) == (403, "UNAUTHORIZED")
    assert (denied_topic.status_code, denied_topic.json()["code"]) == (403, "UNAUTHORIZED")
    assert (allowed.status_code, allowed.json()) == (201, {"topic": "news.sports", "id": 1})
    assert await database_sync_to_async(lambda: list(Message.objects.values_list("topic__name", flat=True)))() == [
        "news.sports"
    ]
