"""A WebSocket to the broker that reconnects with backoff and matches replies to requests.

:class:`Connection` is the transport under :class:`~turtlemq_client.Client`,
:class:`~turtlemq_client.Worker` and :class:`~turtlemq_client.Subscriber`. It
keeps one socket open, reopening it with exponential backoff whenever it drops,
and calls its owner back:

* ``on_open()`` after each (re)connect, to register and re-subscribe; requests
  made from there go out before anything else; the connection counts as *ready*
  once it returns;
* ``on_frame(frame)`` for every frame that is not the reply to a request;
* ``on_close()`` after each disconnect;
* ``on_end(reason)`` once, when it stops for good (closed, refused, or gave up).

Replies carry no correlation id on the wire (``STATUS``, ``TOPICS``,
``PUBLISHED``...), but the broker handles one connection's frames in order, so
the replies to requests of one type come back in the order they were sent: a
FIFO of waiters per request type is enough to match them, and an ERROR frame
is matched the same way through the ``type`` in its ``ref``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .errors import BrokerError, ConnectionLost, FrameTooLarge, Unauthorized, error_from_frame

logger = logging.getLogger("turtlemq_client")

Frame = dict[str, Any]

DEFAULT_URL = "ws://127.0.0.1:8000/"
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024  # the broker's default limit (PROTOCOL.md, Transport)
CLOSE_UNAUTHORIZED = 4401

# Request type -> the type of the frame that answers it.
REPLY_TYPES: dict[str, str] = {
    "REGISTER_CLIENT": "REGISTER_CLIENT",
    "REGISTER_WORKER": "REGISTER_WORKER",
    "STATUS": "STATUS",
    "LIST_TOPICS": "TOPICS",
    "SUBSCRIBE": "SUBSCRIBED",
    "UNSUBSCRIBE": "UNSUBSCRIBED",
    "PUBLISH": "PUBLISHED",
}
REQUEST_OF_REPLY: dict[str, str] = {reply: request for request, reply in REPLY_TYPES.items()}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter between reconnection attempts."""

    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2  # +/- this fraction, so that many peers do not reconnect in lockstep

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt number ``attempt`` (0-based)."""
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))

    async def wait(self, delay: float) -> None:
        """Wait before a reconnection attempt; override to pause or pace reconnections."""
        await asyncio.sleep(delay)


def url_with_token(url: str, token: str | None) -> str:
    """The broker URL with the access key as its ``token`` query parameter (PROTOCOL.md, Access control)."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def encode(frame: Frame) -> str:
    """Serialise a frame as the broker does: compact JSON, non-ASCII kept as is."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


class Connection:
    """One logical connection to the broker, reopened with backoff whenever the socket drops."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        on_open: Callable[[], Awaitable[None]] | None = None,
        on_frame: Callable[[Frame], None] | None = None,
        on_close: Callable[[], None] | None = None,
        on_end: Callable[[BaseException], None] | None = None,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
        open_timeout: float = 10.0,
        max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.url = url
        self._connect_url = url_with_token(url, token)
        self._on_open = on_open
        self._on_frame = on_frame
        self._on_close = on_close
        self._on_end = on_end
        self.backoff = backoff or Backoff()
        self.give_up_after = give_up_after  # seconds without a connection before failing; None: never
        self.open_timeout = open_timeout
        self.max_frame_bytes = max_frame_bytes
        self.generation = 0  # incremented on every successful (re)connect
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._waiters: defaultdict[str, deque[asyncio.Future[Frame]]] = defaultdict(deque)
        self._runner: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._closed_by_owner = False

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (idempotent)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"turtlemq connection {self.url}")

    async def close(self) -> None:
        """Close for good: pending and future requests raise :class:`ConnectionLost`."""
        self._closed_by_owner = True
        if self._fatal is None:
            self._fatal = ConnectionLost("the connection was closed")
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.wait([self._runner])  # whatever ended it, closing does not raise
        self._ready.set()  # wake waiters so that they see the closed state

    async def __aenter__(self) -> Connection:
        self.start()
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        """Whether the socket is open and ``on_open`` has finished on it."""
        return self._ready.is_set() and self._fatal is None

    @property
    def closed_by_owner(self) -> bool:
        """Whether :meth:`close` ended the connection (rather than a refusal or giving up)."""
        return self._closed_by_owner

    @property
    def closed(self) -> bool:
        """Whether the connection was closed or gave up for good."""
        return self._fatal is not None

    async def wait_ended(self) -> None:
        """Wait until the connection stops for good: return if it was closed, raise the reason otherwise."""
        self.start()
        assert self._runner is not None
        await asyncio.wait([self._runner])  # never raises the runner's outcome, unlike awaiting it
        if not self._closed_by_owner and self._fatal is not None:
            raise self._fatal

    async def wait_ready(self) -> int:
        """Wait until the connection is ready; return its generation. Raises the reason it ended, if it did."""
        self.start()
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._ready.is_set():
                return self.generation
            await self._ready.wait()

    # --- sending -----------------------------------------------------------------

    async def send(self, frame: Frame, *, generation: int | None = None, opening: bool = False) -> bool:
        """Send a frame if the connection is ready (and still of ``generation``); return whether it was sent.

        ``opening=True`` also sends before the connection counts as ready: for ``on_open``, and for answers
        that belong to the socket of ``generation`` whatever its state (a worker's results).
        """
        text = self.encode(frame)
        ws = self._ws
        if ws is None or (not opening and not self._ready.is_set()):
            return False
        if generation is not None and generation != self.generation:
            return False
        try:
            await ws.send(text)
        except ConnectionClosed:
            return False
        return True

    async def request(self, frame: Frame, *, retry: bool = True, opening: bool = False) -> Frame:
        """Send a frame and return the broker's reply; an ERROR reply raises its :class:`BrokerError`.

        With ``retry`` a request cut off by a disconnect is sent again once reconnected (for requests that
        are safe to repeat); without it the cut-off request raises :class:`ConnectionLost`.
        """
        text = self.encode(frame)
        while True:
            if not opening:
                await self.wait_ready()
            try:
                return await self._request_now(frame["type"], text)
            except ConnectionLost:
                if opening or not retry or self._fatal is not None:
                    raise

    async def _request_now(self, request_type: str, text: str) -> Frame:
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiters[request_type].append(future)
        try:
            await ws.send(text)
        except ConnectionClosed as exc:
            future.cancel()
            raise ConnectionLost("the connection closed while sending") from exc
        return await future

    def encode(self, frame: Frame) -> str:
        """The frame's text; raises :class:`FrameTooLarge` if the broker would refuse it for its size."""
        text = encode(frame)
        if self.max_frame_bytes is not None and len(text) > self.max_frame_bytes // 4:
            size = len(text.encode())
            if size > self.max_frame_bytes:
                raise FrameTooLarge(f"a {frame.get('type')} frame of {size} bytes exceeds {self.max_frame_bytes}")
        return text

    # --- convenience requests ------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The broker's counts (STATUS): idle and busy workers, queued and running tasks, ..."""
        reply = await self.request({"type": "STATUS"})
        data = reply.get("data")
        return dict(data) if isinstance(data, dict) else {}

    async def list_topics(self) -> list[str]:
        """The names of the broker's topics, sorted (LIST_TOPICS)."""
        reply = await self.request({"type": "LIST_TOPICS"})
        return [str(name) for name in reply.get("data") or []]

    async def publish(self, topic: str, data: str) -> int:
        """Publish ``data`` on ``topic`` and return the message's id in that topic.

        Sent at most once: if the connection drops before PUBLISHED arrives this raises
        :class:`ConnectionLost`, since the message may or may not have been stored.
        """
        reply = await self.request({"type": "PUBLISH", "topic": topic, "data": data}, retry=False)
        return int(reply["id"])

    # --- the background loop ---------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        down_since = time.monotonic()
        last_error: Exception | None = None
        try:
            while True:
                try:
                    ws = await websockets.connect(
                        self._connect_url, max_size=None, open_timeout=self.open_timeout, close_timeout=2
                    )
                except InvalidStatus as exc:
                    if exc.response.status_code in (401, 403):
                        self._fatal = Unauthorized(f"the broker refused the connection ({exc.response.status_code})")
                        return
                    last_error = exc
                except InvalidURI as exc:
                    self._fatal = ConnectionLost(f"invalid broker URL {self.url!r}: {exc}")
                    return
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    last_error = exc
                else:
                    opened = await self._serve(ws)
                    if self._fatal is not None:
                        return
                    if opened:
                        attempt = 0
                    down_since = time.monotonic()
                    last_error = ConnectionLost("the connection closed")
                delay = self.backoff.delay(attempt)
                attempt += 1
                if self.give_up_after is not None and time.monotonic() + delay - down_since > self.give_up_after:
                    self._fatal = ConnectionLost(f"could not connect to {self.url}: {last_error}")
                    return
                logger.info("reconnecting to %s in %.2f s (%s)", self.url, delay, last_error)
                await self.backoff.wait(delay)
        finally:
            if self._fatal is None:
                self._fatal = ConnectionLost("the connection was closed")
            self._ready.set()  # wake waiters: the loop is over, they will see _fatal
            if self._on_end is not None:
                try:
                    self._on_end(self._fatal)
                except Exception:
                    logger.exception("on_end callback failed")

    async def _serve(self, ws: ClientConnection) -> bool:
        """Run one socket until it closes; return whether ``on_open`` completed on it."""
        self._ws = ws
        self.generation += 1
        reader = asyncio.create_task(self._read(ws))
        opened = False
        try:
            if self._on_open is not None:
                await self._on_open()
            opened = True
            if self._ws is ws:
                self._ready.set()
        except ConnectionLost:
            pass  # the socket dropped while opening; reconnect
        except BrokerError as exc:
            # The broker refused registration or re-subscription: retrying would not help.
            self._fatal = exc
            await ws.close()
        except BaseException:
            reader.cancel()
            await ws.close()
            raise
        try:
            await reader
        except asyncio.CancelledError:
            reader.cancel()
            await ws.close()
            raise
        if ws.close_code == CLOSE_UNAUTHORIZED and self._fatal is None:
            self._fatal = Unauthorized(ws.close_reason or "the broker closed the connection: unauthorized")
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                logger.exception("on_close callback failed")
        return opened

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                if not isinstance(raw, str):
                    continue  # the broker never sends binary frames
                try:
                    frame = json.loads(raw)
                except ValueError:
                    logger.warning("ignoring a frame that is not JSON: %.200r", raw)
                    continue
                if isinstance(frame, dict):
                    self._route(frame)
        except ConnectionClosed:
            pass
        finally:
            # Not ready any more *before* waking the waiters, so that a retrying request waits for the next socket.
            self._ready.clear()
            self._ws = None
            for waiters in self._waiters.values():
                for future in waiters:
                    if not future.done():
                        future.set_exception(ConnectionLost("the connection closed before the broker answered"))
            self._waiters.clear()

    def _route(self, frame: Frame) -> None:
        frame_type = frame.get("type")
        if frame_type == "ERROR":
            ref = frame.get("ref")
            request_type = ref.get("type") if isinstance(ref, dict) else None
            waiters = self._waiters.get(request_type) if isinstance(request_type, str) else None
            if waiters:
                future = waiters.popleft()
                if not future.done():
                    future.set_exception(error_from_frame(frame))
                return
        elif isinstance(frame_type, str) and frame_type in REQUEST_OF_REPLY:
            waiters = self._waiters.get(REQUEST_OF_REPLY[frame_type])
            if waiters:
                future = waiters.popleft()
                if not future.done():
                    future.set_result(frame)
                return
        if self._on_frame is not None:
            try:
                self._on_frame(frame)
            except Exception:
                logger.exception("on_frame callback failed for a %s frame", frame_type)
