"""Topics end to end: real daphne processes, real WebSocket clients, a real SMTP server.

On the PostgreSQL + Redis stack, subscribers and publishers are spread over
both broker processes, so every message crosses the Redis layer and
publishers in different processes race for sequence numbers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from email import message_from_bytes, policy
from email.message import EmailMessage as ReceivedMail
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from .peers import Peer, wait_until
from .servers import REPO_ROOT, Stack

pytestmark = pytest.mark.e2e


async def subscriber(url: str, topic: str, **extra: Any) -> Peer:
    peer = await Peer.connect(url)
    await peer.send({"type": "SUBSCRIBE", "topic": topic, **extra})
    frame = await peer.expect("SUBSCRIBED")
    assert frame["topic"] == topic
    return peer


async def publish_all(url: str, messages: list[tuple[str, str]]) -> dict[tuple[str, int], str]:
    """Publish (topic, data) pairs one after another; returns {(topic, id): data} from the PUBLISHED answers."""
    publisher = await Peer.connect(url)
    published = {}
    for topic, data in messages:
        await publisher.send({"type": "PUBLISH", "topic": topic, "data": data})
        answer = await publisher.expect("PUBLISHED")
        assert answer["topic"] == topic
        published[(topic, answer["id"])] = data
    await publisher.close()
    return published


async def messages_of(peer: Peer, count: int) -> list[tuple[str, int, str]]:
    frames = await peer.collect("MESSAGE", count, timeout=30)
    return [(frame["topic"], frame["id"], frame["data"]) for frame in frames]


def urls(stack: Stack) -> list[str]:
    return [stack.client_url, stack.worker_url]


def http_base(stack: Stack) -> str:
    return stack.client_url.replace("ws://", "http://").rstrip("/")


# --- fan-out ----------------------------------------------------------------------------------


async def test_fifty_subscribers_on_two_topics_each_get_exactly_their_topics_messages_in_order(stack):
    stack.manage("create_topic", "e2e.red", "--description", "Red")
    stack.manage("create_topic", "e2e.blue", "--description", "Blue")
    topics = ["e2e.red", "e2e.blue"]
    # Half on each topic, and alternately on each broker process.
    subscribers = await asyncio.gather(*(subscriber(urls(stack)[(n // 2) % 2], topics[n % 2]) for n in range(50)))
    per_publisher = 20
    publishers = [
        publish_all(url, [(topics[i % 2], f"{name}-{i}") for i in range(per_publisher)])
        for name, url in zip(["p0", "p1"], urls(stack), strict=True)
    ]
    published: dict[tuple[str, int], str] = {}
    for answers in await asyncio.gather(*publishers):
        published |= answers
    per_topic = per_publisher  # two publishers, each half on each topic
    for topic in topics:
        assert sorted(seq for name, seq in published if name == topic) == list(range(1, per_topic + 1))
    received = await asyncio.gather(*(messages_of(peer, per_topic) for peer in subscribers))
    for n, messages in enumerate(received):
        topic = topics[n % 2]
        assert messages == [(topic, seq, published[(topic, seq)]) for seq in range(1, per_topic + 1)], n
    for peer in subscribers:
        await peer.close()


async def test_a_message_published_over_http_reaches_subscribers_on_every_broker_process(stack):
    stack.manage("create_topic", "e2e.http")
    subscribers = [await subscriber(url, "e2e.http") for url in urls(stack)]
    request = urllib.request.Request(
        f"{http_base(stack)}/api/topics/e2e.http/messages",
        data=json.dumps({"data": "from a server"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=10) as response:
        assert response.status == 201
        assert json.loads(response.read()) == {"topic": "e2e.http", "id": 1}
    for peer in subscribers:
        assert await messages_of(peer, 1) == [("e2e.http", 1, "from a server")]
        await peer.close()


async def test_a_subscriber_that_reconnects_with_since_gets_what_it_missed_then_live_messages(stack):
    stack.manage("create_topic", "e2e.resume")
    first = await subscriber(stack.worker_url, "e2e.resume")
    await publish_all(stack.client_url, [("e2e.resume", f"m{i}") for i in range(1, 4)])
    seen = await messages_of(first, 3)
    await first.close()
    await publish_all(stack.client_url, [("e2e.resume", f"m{i}") for i in range(4, 7)])
    again = await subscriber(stack.worker_url, "e2e.resume", since=seen[-1][1])
    replay_and_live = asyncio.ensure_future(messages_of(again, 4))
    await publish_all(stack.client_url, [("e2e.resume", "m7")])
    assert await replay_and_live == [("e2e.resume", i, f"m{i}") for i in range(4, 8)]
    await again.close()


async def test_a_pattern_subscriber_follows_a_topic_created_later_by_the_command(stack):
    if stack.name == "embedded":
        pytest.skip("a command runs in its own process, which the in-memory layer of the server cannot reach")
    watchers = [await subscriber(url, "e2e.late.*") for url in urls(stack)]
    stack.manage("create_topic", "e2e.late.news")
    await publish_all(stack.client_url, [("e2e.late.news", "hello")])
    for peer in watchers:
        assert await messages_of(peer, 1) == [("e2e.late.news", 1, "hello")]
        await peer.close()


async def test_an_idle_subscriber_stays_connected_past_the_redis_read_timeout(stack):
    if stack.name == "embedded":
        pytest.skip("only the Redis layer has a read timeout")
    stack.manage("create_topic", "e2e.idle")
    peer = await subscriber(stack.worker_url, "e2e.idle")
    await asyncio.sleep(6.5)  # idle on purpose: longer than redis-py's default 5 s read timeout
    await publish_all(stack.client_url, [("e2e.idle", "still there?")])
    assert await messages_of(peer, 1) == [("e2e.idle", 1, "still there?")]
    await peer.close()


# --- e-mail ------------------------------------------------------------------------------------


class RecordingSMTPHandler:
    """Keeps every mail the SMTP server accepts."""

    def __init__(self) -> None:
        self.mails: list[ReceivedMail] = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd calls its hooks by name
        self.mails.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    handler = RecordingSMTPHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.env = {  # type: ignore[attr-defined]
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(port),
        "DEFAULT_FROM_EMAIL": "notify@turtlemq.test",
        "TURTLEMQ_PUBLIC_URL": "https://mq.example.org",
    }
    yield handler
    controller.stop()


def sender(stack: Stack, smtp: RecordingSMTPHandler, *args: str) -> subprocess.Popen:
    """``manage.py send_notifications`` as its own process, sending to the test's SMTP server."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "send_notifications", *args],
        cwd=REPO_ROOT,
        env=stack.env | smtp.env,  # type: ignore[attr-defined]
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_two_senders_at_once_deliver_every_email_exactly_once(stack, smtp):
    stack.manage("create_topic", "e2e.mail")
    addresses = [f"reader{n}@example.com" for n in range(6)]
    for n, address in enumerate(addresses):
        await (await subscriber(urls(stack)[n % 2], "e2e.mail", email=address)).close()
    await publish_all(stack.client_url, [("e2e.mail", f"news {i}") for i in range(1, 6)])
    senders = [sender(stack, smtp, "--once", "--batch", "3") for _ in range(2)]
    for process in senders:
        _, err = await asyncio.to_thread(process.communicate, timeout=60)
        assert process.returncode == 0, err
    message_ids = [mail["Message-ID"] for mail in smtp.mails]
    assert len(message_ids) == len(set(message_ids)) == 30
    assert sorted((mail["To"], mail["Subject"]) for mail in smtp.mails) == sorted(
        (address, f"[e2e.mail] New message #{i}") for address in addresses for i in range(1, 6)
    )


async def test_send_notifications_keeps_delivering_new_messages_until_it_is_stopped(stack, smtp):
    stack.manage("create_topic", "e2e.mail.live")
    await (await subscriber(stack.worker_url, "e2e.mail.live", email="reader@example.com")).close()
    process = sender(stack, smtp, "--interval", "0.2")
    try:
        for i in range(1, 3):
            await publish_all(stack.client_url, [("e2e.mail.live", f"update {i}")])
            await wait_until(lambda i=i: len(smtp.mails) == i, timeout=20, what=f"e-mail {i}")
            body = smtp.mails[-1].get_body(preferencelist=("plain",)).get_content()
            assert f"update {i}" in body and "https://mq.example.org/unsubscribe/" in body
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(process.communicate, timeout=20)
        assert process.returncode == 0, err
        assert out == "sent 2, will retry 0, failed 0\n"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
