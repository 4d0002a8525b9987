"""WebSocket peers for end-to-end tests: thin wrappers over the ``websockets`` client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets


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

    async def close(self) -> None:
        await self.connection.close()
