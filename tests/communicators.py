"""In-process peers of the broker for consumer tests, over ``channels.testing.WebsocketCommunicator``.

A :class:`Peer` wraps one communicator with the vocabulary of the protocol
(register, submit, expect a frame, expect an ERROR); :class:`Peers` opens them
against ``turtlemq_site.asgi.application`` and closes every one at the end of
a test. Every wait has a timeout: with the Redis channel layer, delivery
between connections takes a while.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from turtlemq_site.asgi import application

# How long a test waits for a frame that must arrive.
TIMEOUT = 10.0
# How long a test watches for a frame that must not arrive. Such checks are
# backed by database assertions wherever the database can say it for sure.
QUIET = 0.3


class Peer:
    """One WebSocket connection to the in-process broker."""

    def __init__(self, communicator: WebsocketCommunicator, name: str) -> None:
        self.communicator = communicator
        self.name = name
        self.closed = False

    def __repr__(self) -> str:
        return f"<Peer {self.name}>"

    async def send(self, frame: Any) -> None:
        """Send any JSON value as a text frame."""
        await self.send_text(json.dumps(frame, ensure_ascii=False))

    async def send_text(self, text: str) -> None:
        # Straight to the application: send_to() refuses an empty frame, which a peer may well send.
        await self.communicator.send_input({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.communicator.send_input({"type": "websocket.receive", "bytes": data})

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame from the broker, which must be a JSON text frame."""
        output = await self.communicator.receive_output(timeout)
        assert output["type"] == "websocket.send", f"{self.name} expected a frame, got {output}"
        assert "text" in output and output.get("bytes") is None, f"{self.name} got a non-text frame: {output}"
        return json.loads(output["text"])

    async def expect(self, frame_type: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame, which must be of ``frame_type``."""
        frame = await self.recv(timeout)
        assert frame["type"] == frame_type, f"{self.name} expected {frame_type}, got {frame}"
        return frame

    async def expect_error(self, code: str, ref: dict[str, Any] | None = None) -> dict[str, Any]:
        """The next frame, which must be an ERROR with ``code`` (and ``ref``, when given)."""
        frame = await self.expect("ERROR")
        assert frame["code"] == code, f"{self.name} expected ERROR {code}, got {frame}"
        assert isinstance(frame["message"], str) and frame["message"], frame
        if ref is not None:
            assert frame["ref"] == ref, f"{self.name} expected ref {ref}, got {frame}"
        return frame

    async def expect_close(self, timeout: float = TIMEOUT) -> int:
        """Wait for the broker to close the connection; return the close code.

        Then tell the application the socket is gone, as the server does once it
        has closed it, so that the broker cleans up after the connection.
        """
        output = await self.communicator.receive_output(timeout)
        assert output["type"] == "websocket.close", f"{self.name} expected a close, got {output}"
        await self.close()
        return output.get("code", 1000)

    async def assert_silent(self, seconds: float = QUIET) -> None:
        """Nothing arrives for ``seconds``."""
        if not await self.communicator.receive_nothing(timeout=seconds):
            unexpected = await self.communicator.receive_output(TIMEOUT)
            raise AssertionError(f"{self.name} expected nothing, got {unexpected}")

    async def register_client(self, client_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "REGISTER_CLIENT", "data": ""}
        if client_id is not None:
            frame["clientId"] = client_id
        await self.send(frame)
        assert await self.recv() == frame

    async def register_worker(self, concurrency: int | None = None) -> None:
        frame: dict[str, Any] = {"type": "REGISTER_WORKER", "data": ""}
        if concurrency is not None:
            frame["concurrency"] = concurrency
        await self.send(frame)
        assert await self.recv() == frame

    async def submit(self, message_id: str, data: str, **extra: Any) -> None:
        await self.send({"type": "REQUEST_TASK", "messageId": message_id, "data": data, **extra})

    async def next_task(self) -> dict[str, Any]:
        """The next task handed to this worker; checks the broker's frame shape."""
        frame = await self.expect("REQUEST_TASK")
        assert isinstance(frame["taskId"], str) and frame["taskId"], frame
        assert isinstance(frame["data"], str), frame
        assert "messageId" not in frame, frame
        return frame

    async def respond(self, task: dict[str, Any], result: str) -> None:
        await self.send({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": result})

    async def status(self) -> dict[str, Any]:
        await self.send({"type": "STATUS"})
        return (await self.expect("STATUS"))["data"]

    async def close(self) -> None:
        """Close the socket (as a peer would) and wait for the broker to clean up."""
        if self.closed:
            return
        self.closed = True
        # A timed-out receive cancels the application; there is nothing left to close then.
        if not self.communicator.future.done():
            await self.communicator.disconnect(timeout=TIMEOUT)


class Peers:
    """Opens peers for one test and closes them all afterwards."""

    def __init__(self) -> None:
        self.opened: list[Peer] = []

    async def connect(self, path: str = "/", name: str | None = None) -> Peer:
        communicator = WebsocketCommunicator(application, path)
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected, f"the broker refused a WebSocket at {path}"
        peer = Peer(communicator, name or f"peer{len(self.opened) + 1}")
        self.opened.append(peer)
        return peer

    async def client(self, client_id: str | None = None, name: str | None = None) -> Peer:
        peer = await self.connect(name=name or f"client{len(self.opened) + 1}")
        await peer.register_client(client_id)
        return peer

    async def worker(self, concurrency: int | None = None, name: str | None = None) -> Peer:
        peer = await self.connect(name=name or f"worker{len(self.opened) + 1}")
        await peer.register_worker(concurrency)
        return peer

    async def close_all(self) -> None:
        for peer in self.opened:
            await peer.close()


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT, what: str = "the condition") -> None:
    """Poll a synchronous ``condition`` (it may query the database) until it holds."""
    check = database_sync_to_async(condition)
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.02)
