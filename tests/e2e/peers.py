"""WebSocket peers for end-to-end tests: thin wrappers over the ``websockets`` client.

:class:`Peer` sends frames and awaits them with timeouts; :class:`EchoWorker`
is an in-process worker that answers tasks in the background and records
what it was given; :func:`wait_until` polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import websockets


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "a condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


class Peer:
    """A connection to the broker that sends and awaits JSON frames with timeouts."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, url: str) -> Peer:
        return cls(await websockets.connect(url, max_size=None, open_timeout=10))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.connection.send(text)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.connection.recv(), timeout))

    async def expect(self, frame_type: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame, which must be of ``frame_type``."""
        frame = await self.recv(timeout)
        assert frame["type"] == frame_type, frame
        return frame

    async def collect(self, frame_type: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next ``count`` frames, all of ``frame_type``, within ``timeout`` seconds in total."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        frames = []
        while len(frames) < count:
            try:
                frame = await self.recv(max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise AssertionError(f"got {len(frames)} of {count} {frame_type} frames in {timeout:g} s") from None
            assert frame["type"] == frame_type, frame
            frames.append(frame)
        return frames

    async def expect_closed(self, timeout: float = 10.0) -> int | None:
        """Wait until the connection closes, failing if a frame arrives first; the broker's close code.

        ``None`` means no close frame came (the broker process died).
        """
        try:
            frame = await asyncio.wait_for(self.connection.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        raise AssertionError(f"expected the connection to close, got {frame!r}")

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

    async def request_task(self, message_id: str, data: str) -> None:
        await self.send({"type": "REQUEST_TASK", "messageId": message_id, "data": data})

    async def status(self) -> dict[str, Any]:
        """Ask for STATUS and return its counts; the answer must be the very next frame.

        Frames of one connection are handled in order, so the answer also
        proves that everything this peer sent before was processed, and that
        no other frame (a duplicate result, say) was waiting ahead of it.
        """
        await self.send({"type": "STATUS"})
        return (await self.expect("STATUS"))["data"]

    async def close(self) -> None:
        await self.connection.close()


class EchoWorker:
    """An in-process worker: answers each task with its data upper-cased, except the ones it holds.

    Tasks whose data starts with ``hold_prefix`` are never answered (``""``
    holds every task). ``got`` lists (taskId, data) of every REQUEST_TASK in
    arrival order; any other frame lands in ``unexpected``.
    """

    def __init__(self, peer: Peer, hold_prefix: str | None = None) -> None:
        self.peer = peer
        self.hold_prefix = hold_prefix
        self.got: list[tuple[str, str]] = []
        self.unexpected: list[dict[str, Any]] = []
        self._serving: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, url: str, concurrency: int | None = None, hold_prefix: str | None = None) -> EchoWorker:
        peer = await Peer.connect(url)
        await peer.register_worker(concurrency)
        worker = cls(peer, hold_prefix)
        worker._serving = asyncio.create_task(worker._serve())
        return worker

    async def _serve(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.peer.connection:
                frame = json.loads(raw)
                if frame.get("type") != "REQUEST_TASK":
                    self.unexpected.append(frame)
                    continue
                self.got.append((frame["taskId"], frame["data"]))
                if self.hold_prefix is not None and frame["data"].startswith(self.hold_prefix):
                    continue
                await self.peer.send(
                    {"type": "RESPONSE_TASK", "taskId": frame["taskId"], "data": frame["data"].upper()}
                )

    @property
    def data(self) -> list[str]:
        """The data of the tasks received, in arrival order."""
        return [data for _, data in self.got]

    @property
    def disconnected(self) -> bool:
        return self._serving is not None and self._serving.done()

    async def wait_for_tasks(self, count: int, timeout: float = 10.0) -> list[tuple[str, str]]:
        """Wait until at least ``count`` tasks arrived; return them all."""
        await wait_until(lambda: len(self.got) >= count, timeout, f"{count} tasks (got {self.got})")
        return self.got

    async def wait_disconnected(self, timeout: float = 10.0) -> None:
        await wait_until(lambda: self.disconnected, timeout, "the worker's connection to close")

    async def close(self) -> None:
        await self.peer.close()
        if self._serving is not None:
            await asyncio.wait_for(self._serving, 10)
