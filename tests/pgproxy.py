"""A TCP proxy in front of PostgreSQL that loses a connection at the worst moment, on demand.

PostgreSQL commits a pipeline when it reaches its Sync message (a simple
query such as COMMIT, on its own). A client whose connection breaks after
sending it cannot tell whether the transaction committed: the case that
``broker.pgloop`` and ``dispatch.run_batch`` must settle, and no mock can show
what a real server does then. This proxy passes bytes through both ways, and
an end hung up on one side is hung up on the other, until it is armed; then,
once the client has sent its next Sync (or the bytes it was armed ``on``), it
cuts the client off, in one of two ways:

* ``"after_answer"``: the server's answer (up to its ReadyForQuery) is read
  and thrown away, then the client is cut off: the transaction committed, and
  the client never heard.
* ``"after_sync"``: the client is cut off at once, while the server goes on
  with what it received (it may be waiting for a lock, or for the rest of a
  transaction, say): its side stays open until :meth:`CuttingProxy.close`.

With ``then_refuse=n``, the next ``n`` connections made after the cut are
refused (the database out of reach for a while). Connections need
``sslmode=disable``: the proxy must read the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"  # libpq's pipeline sends one after its Sync
READY_FOR_QUERY = b"Z\x00\x00\x00\x05"

Cut = Literal["after_answer", "after_sync"]


class CuttingProxy:
    """Listens on a free loopback port and forwards every connection to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listening_port = 0
        self.armed: Cut | None = None
        self.refuse_after_cut = 0  # connections still to refuse once cut
        self.armed_on: bytes | None = None
        self.cut = asyncio.Event()  # set once a connection was cut off
        self._server: asyncio.Server | None = None
        self._upstreams: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> CuttingProxy:
        """Listen on loopback ``port`` (0: a free one, then in ``listening_port``)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.listening_port = self._server.sockets[0].getsockname()[1]
        return self

    def arm(self, how: Cut, then_refuse: int = 0, on: bytes | None = None) -> None:
        """Cut off the next connection to send a Sync (see the module's docstring).

        ``on``: rather the next one to send these bytes (a simple query such as
        COMMIT ends with no Sync; its answer, too, ends with ReadyForQuery).
        """
        self.armed = how
        self.refuse_after_cut = then_refuse
        self.armed_on = on
        self.cut.clear()

    def _triggers(self, data: bytes) -> bool:
        if self.armed_on is not None:
            return self.armed_on in data
        return data.endswith((SYNC, SYNC + FLUSH))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for upstream in self._upstreams:
            upstream.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.cut.is_set() and self.refuse_after_cut:
            self.refuse_after_cut -= 1
            client_writer.transport.abort()
            return
        server_reader, server_writer = await asyncio.open_connection(self.host, self.port)
        self._upstreams.append(server_writer)
        answer_lost = asyncio.Event()  # set when the client's next answer must be thrown away

        async def to_server() -> None:
            while data := await client_reader.read(65536):
                how = None
                if self.armed and self._triggers(data):
                    how, self.armed = self.armed, None
                if how == "after_answer":
                    answer_lost.set()  # before the server can answer
                server_writer.write(data)
                await server_writer.drain()
                if how == "after_sync":
                    self._cut_off(client_writer)
                    return
            server_writer.close()  # the client hung up

        async def to_client() -> None:
            lost = b""
            while data := await server_reader.read(65536):
                if answer_lost.is_set():
                    lost += data
                    if READY_FOR_QUERY in lost:
                        self._cut_off(client_writer)
                        return
                    continue
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()  # the server hung up

        pumps = [asyncio.ensure_future(to_server()), asyncio.ensure_future(to_client())]
        self._pumps.update(pumps)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await asyncio.gather(*pumps)

    def _cut_off(self, client_writer: asyncio.StreamWriter) -> None:
        client_writer.transport.abort()
        self.cut.set()
