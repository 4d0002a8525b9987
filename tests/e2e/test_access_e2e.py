"""End-to-end tests of access control and limits through real daphne processes, on both stacks.

Keys are made with ``manage.py create_access_key`` against the stack's
database, as an operator would, and presented the three ways PROTOCOL.md
allows. On PostgreSQL + Redis the clients talk to one broker process and the
workers to the other.
"""

from __future__ import annotations

import pytest
import websockets

from .peers import EchoWorker, Peer
from .servers import Stack

pytestmark = pytest.mark.e2e


def create_key(stack: Stack, name: str, roles: str, *topics: str) -> str:
    arguments = ["create_access_key", name, "--roles", roles]
    if topics:
        arguments += ["--topics", *topics]
    return stack.manage(*arguments).stdout.strip()


async def expect_unauthorized_close(peer: Peer) -> None:
    error = await peer.expect("ERROR")
    assert error["code"] == "UNAUTHORIZED", error
    assert await peer.expect_closed() == 4401


@pytest.mark.stack_env(TURTLEMQ_AUTH="1")
async def test_keys_by_query_header_or_first_frame_admit_peers_and_anything_else_is_refused(stack: Stack) -> None:
    tasks_key = create_key(stack, "e2e tasks", "client,worker")
    client_key = create_key(stack, "e2e client", "client")

    # A worker with the key in the query string, a client with it in a header.
    worker = await EchoWorker.start(f"{stack.worker_url}?token={tasks_key}")
    by_header = Peer(
        await websockets.connect(
            stack.client_url, additional_headers={"Authorization": f"Bearer {client_key}"}, open_timeout=10
        )
    )
    await by_header.register_client()
    await by_header.request_task("h1", "by header")
    assert await by_header.expect("RESPONSE_TASK") == {"type": "RESPONSE_TASK", "messageId": "h1", "data": "BY HEADER"}

    # A client with the key in its first frame.
    by_frame = await Peer.connect(stack.client_url)
    register = {"type": "REGISTER_CLIENT", "data": "", "token": client_key}
    await by_frame.send(register)
    assert await by_frame.recv() == register
    await by_frame.request_task("f1", "by frame")
    assert await by_frame.expect("RESPONSE_TASK") == {"type": "RESPONSE_TASK", "messageId": "f1", "data": "BY FRAME"}

    # A valid key beyond its role: refused, and the connection stays.
    await by_header.send({"type": "REGISTER_WORKER", "data": ""})
    denied = await by_header.expect("ERROR")
    assert (denied["code"], denied["ref"]) == ("UNAUTHORIZED", {"type": "REGISTER_WORKER"})
    assert "idleWorkers" in await by_header.status()

    # No key, a wrong key: ERROR UNAUTHORIZED and a close with 4401.
    wrong = client_key[:-4] + ("AAAA" if not client_key.endswith("AAAA") else "BBBB")
    no_key = await Peer.connect(stack.client_url)
    await no_key.send({"type": "REGISTER_CLIENT", "data": ""})
    await expect_unauthorized_close(no_key)
    await expect_unauthorized_close(await Peer.connect(f"{stack.client_url}?token={wrong}"))
    wrong_frame = await Peer.connect(stack.client_url)
    await wrong_frame.send({"type": "REGISTER_CLIENT", "data": "", "token": wrong})
    await expect_unauthorized_close(wrong_frame)

    assert worker.data == ["by header", "by frame"] and worker.unexpected == []
    for peer in (by_header, by_frame):
        await peer.close()
    await worker.close()


@pytest.mark.stack_env(
    TURTLEMQ_ALLOWED_ORIGINS="https://app.example",
    TURTLEMQ_MAX_CLIENT_IN_FLIGHT="2",
    TURTLEMQ_MAX_FRAMES_PER_SECOND="0.001",
    TURTLEMQ_FRAME_BURST="6",
)
async def test_origins_in_flight_and_frame_rate_limits(stack: Stack) -> None:
    # A browser page from another origin is refused at the handshake; a program without Origin is not.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(stack.client_url, origin="https://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    page = Peer(await websockets.connect(stack.client_url, origin="https://app.example", open_timeout=10))
    program = await Peer.connect(stack.client_url)

    # Two unfinished tasks at most per client (no worker is connected).
    await program.register_client()  # frame 1 of 6
    for message_id in ("m1", "m2", "m3"):  # frames 2-4
        await program.request_task(message_id, "waits")
    limited = await program.expect("ERROR")
    assert (limited["code"], limited["ref"]) == ("RATE_LIMITED", {"type": "REQUEST_TASK", "messageId": "m3"})
    assert (await program.status())["queuedTasks"] == 2  # frame 5

    # Six frames in a burst, then (almost) no more: the rest are refused, the connection stays open.
    await program.status()  # frame 6
    await program.send({"type": "STATUS"})
    limited = await program.expect("ERROR")
    assert (limited["code"], limited["ref"]) == ("RATE_LIMITED", {"type": "STATUS"})
    assert "idleWorkers" in await page.status()  # another connection has its own budget

    await page.close()
    await program.close()
