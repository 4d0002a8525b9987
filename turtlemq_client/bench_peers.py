"""The peers of ``turtlemq bench``: raw frames, exactly those of the reference harness's ``ws`` system.

The benchmark does not go through :class:`~turtlemq_client.Client` and friends:
to compare with ``shared/bench/harness.py --system ws`` it must put the same
frames on the wire and nothing else (one REGISTER echo, then REQUEST_TASK /
RESPONSE_TASK; or SUBSCRIBE, then PUBLISH / MESSAGE; no clientId, no
reconnects). On top of the harness it checks every answer: each result once,
each message once and in order, nothing on a topic that was not published to.

The worker and subscriber roles run in a child process of their own (as in the
harness); they talk to the parent in lines on stdout (``READY``, ``SUBSCRIBED``,
``PROGRESS n``, ``RESULT {json}``, ``FAILED why``) and stop on ``STOP`` or end
of stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from .errors import TurtleMQError

now = time.monotonic  # CLOCK_MONOTONIC on Linux: comparable between the benchmark's processes
PAYLOAD_LEN = 100
_FILL = "abcdefghijklmnopqrstuvwxyz" * 4
PROBE = "PROBE"
TOPIC_A, TOPIC_B = "A", "B"
REGISTER_TIMEOUT = 10.0
SUBSCRIBE_TIMEOUT = 60.0
OPENING_AT_ONCE = 16  # connections opened concurrently, as the harness does
PROGRESS_EVERY = 0.2

Frame = dict[str, Any]


class BenchError(TurtleMQError):
    """The benchmark could not run, or the broker answered wrongly."""


def task_payload(n: int) -> str:
    """The data of task ``n``: 100 ASCII bytes, unique per ``n`` (the harness's payload)."""
    return (f"{n:010d}-" + _FILL)[:PAYLOAD_LEN]


def topic_payload(seq: int) -> str:
    """The data of message ``seq`` on topic A; its first 8 characters are ``seq``, to check order."""
    return (f"{seq:08d}:" + _FILL)[:PAYLOAD_LEN]


def error_text(frame: Mapping[str, Any]) -> str:
    return f"{frame.get('code')} ({frame.get('message')})"


async def open_socket(url: str) -> ClientConnection:
    """A WebSocket to ``url`` with the harness's settings; a BenchError if it cannot be opened."""
    try:
        return await connect(url, compression=None, max_size=2**22, open_timeout=30, close_timeout=2)
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise BenchError(f"cannot connect to {url}: {exc}") from exc


async def expect(ws: ClientConnection, kind: str, timeout: float) -> Frame:
    """Read frames until one of type ``kind``; an ERROR first, a close or the timeout is a BenchError."""

    async def read() -> Frame:
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == kind:
                return frame
            if frame.get("type") == "ERROR":
                raise BenchError(f"the broker answered {error_text(frame)} instead of {kind}")

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise BenchError(f"no {kind} from the broker within {timeout:g} s") from None
    except ConnectionClosed as exc:
        raise BenchError(f"the broker closed the connection before {kind}: {exc}") from exc


async def register(ws: ClientConnection, kind: str) -> None:
    """Register as ``REGISTER_CLIENT`` or ``REGISTER_WORKER`` and wait for the echo."""
    await ws.send(json.dumps({"type": kind, "data": ""}))
    await expect(ws, kind, REGISTER_TIMEOUT)


# --- client -------------------------------------------------------------------------------


class RpcClient:
    """One client connection: submits tasks and matches each RESPONSE_TASK to its messageId."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._prefix = uuid.uuid4().hex[:8] + "-"
        self._ids = itertools.count()
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self.unexpected = 0  # results for no task in flight: duplicates, or not ours
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> RpcClient:
        ws = await open_socket(url)
        await register(ws, "REGISTER_CLIENT")
        return cls(ws)

    async def call(self, data: str) -> str:
        """Submit ``data``; its result, or a BenchError (TASK_FAILED, ERROR, connection lost)."""
        message_id = self._prefix + str(next(self._ids))
        future = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        try:
            await self._ws.send(json.dumps({"type": "REQUEST_TASK", "messageId": message_id, "data": data}))
        except ConnectionClosed as exc:
            self._waiting.pop(message_id, None)
            raise BenchError(f"connection lost: {exc}") from exc
        return await future

    def _settle(self, message_id: Any, result: str | None = None, error: BenchError | None = None) -> None:
        future = self._waiting.pop(message_id, None) if isinstance(message_id, str) else None
        if future is None:
            self.unexpected += 1
        elif not future.done():
            if error is None:
                future.set_result(result)  # type: ignore[arg-type]
            else:
                future.set_exception(error)

    async def _read(self) -> None:
        ended = "the broker closed the client connection"
        try:
            async for raw in self._ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "RESPONSE_TASK":
                    self._settle(frame.get("messageId"), result=frame.get("data"))
                elif kind == "TASK_FAILED":
                    self._settle(frame.get("messageId"), error=BenchError(f"task failed: {frame.get('data')}"))
                elif kind == "ERROR":
                    ref = frame.get("ref") or {}
                    self._settle(ref.get("messageId"), error=BenchError(f"broker error {error_text(frame)}"))
        except ConnectionClosed as exc:
            ended += f" ({exc})"
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(BenchError(ended))
            self._waiting.clear()

    async def close(self) -> None:
        self._reader.cancel()
        await self._ws.close()


# --- publisher ----------------------------------------------------------------------------


class Publisher:
    """One connection that publishes without waiting, counting the PUBLISHED confirmations as they come."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.sent = 0
        self.confirmed = 0
        self.errors: list[str] = []
        self.ids_in_order = True  # PUBLISHED ids increase within each topic
        self._last_ids: dict[str, int] = {}
        self._confirmed_all = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str) -> Publisher:
        return cls(await open_socket(url))

    async def missing_topics(self, names: Sequence[str]) -> list[str]:
        """Which of ``names`` the broker does not list (LIST_TOPICS); call before :meth:`publish`."""
        await self._ws.send(json.dumps({"type": "LIST_TOPICS"}))
        try:
            topics = (await expect(self._ws, "TOPICS", REGISTER_TIMEOUT)).get("data") or []
        except BenchError as exc:
            raise BenchError(f"the broker does not list its topics: {exc}") from exc
        return [name for name in names if name not in topics]

    async def publish(self, topic: str, datas: Sequence[str]) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        for data in datas:
            self.sent += 1
            self._confirmed_all.clear()
            await self._ws.send(json.dumps({"type": "PUBLISH", "topic": topic, "data": data}))

    async def wait_confirmed(self, timeout: float) -> None:
        """Wait until every PUBLISH sent so far is confirmed (the confirmations are checked, not timed)."""
        try:
            await asyncio.wait_for(self._confirmed_all.wait(), timeout)
        except TimeoutError:
            self.errors.append(f"{self.sent - self.confirmed} PUBLISH frames unconfirmed after {timeout:g} s")

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                frame = json.loads(raw)
                if frame.get("type") == "PUBLISHED":
                    self.confirmed += 1
                    topic, message_id = frame.get("topic"), frame.get("id")
                    if isinstance(topic, str) and isinstance(message_id, int):
                        self.ids_in_order &= message_id > self._last_ids.get(topic, -1)
                        self._last_ids[topic] = message_id
                elif frame.get("type") == "ERROR":
                    self.confirmed += 1
                    self.errors.append(f"PUBLISH refused: {error_text(frame)}")
                if self.confirmed >= self.sent:
                    self._confirmed_all.set()
        except ConnectionClosed:
            self.errors.append("the broker closed the publisher's connection")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._ws.close()


# --- the child roles -------------------------------------------------------------------------


def say(word: str, payload: Any = None) -> None:
    """One line to the parent process."""
    line = word if payload is None else f"{word} {payload if isinstance(payload, str) else json.dumps(payload)}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stop_requested() -> asyncio.Event:
    """An event set when the parent writes ``STOP`` or closes our stdin."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def watch() -> None:
        for line in sys.stdin:
            if line.strip() == "STOP":
                break
        loop.call_soon_threadsafe(event.set)

    # A daemon thread: a blocked read must not keep the process alive.
    threading.Thread(target=watch, daemon=True).start()
    return event


async def worker_role(url: str, workers: int, lifetime: float) -> None:
    """``workers`` worker connections that upper-case each task's data, until told to stop."""
    stats: Counter[str] = Counter()

    async def work(ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "REQUEST_TASK":
                    result = {"type": "RESPONSE_TASK", "taskId": frame["taskId"], "data": frame["data"].upper()}
                    await ws.send(json.dumps(result))
                    stats["done"] += 1
                elif frame.get("type") == "ERROR":
                    stats["errors"] += 1
        except ConnectionClosed:
            stats["closed"] += 1

    async def open_worker() -> ClientConnection:
        ws = await open_socket(url)
        await register(ws, "REGISTER_WORKER")
        return ws

    stop = stop_requested()
    try:
        sockets = await asyncio.gather(*(open_worker() for _ in range(workers)))
    except BenchError as exc:
        say("FAILED", str(exc))
        return
    loops = [asyncio.create_task(work(ws)) for ws in sockets]
    say("READY")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    for task in loops:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    say("STATS", dict(stats))


class FanoutTally:
    """What the subscribers received: subscribers ``0..subs-1`` follow A, ``subs..2*subs-1`` follow B."""

    def __init__(self, subs: int, messages: int) -> None:
        self.subs, self.messages = subs, messages
        self.counts = [0] * subs
        self.next_seq = [0] * subs
        self.last_id = [-1] * subs
        self.probed = [False] * (2 * subs)
        self.probed_count = 0
        self.out_of_order = 0  # a gap, a duplicate or a reordering on A
        self.b_received = 0  # messages of A (or anything but probes) seen on B
        self.foreign = 0  # a MESSAGE naming a topic the connection does not follow
        self.errors = 0
        self.complete = 0
        self.delivered = 0
        self.t_last: float | None = None
        self.all_probed = asyncio.Event()
        self.all_complete = asyncio.Event()

    def on_frame(self, index: int, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "ERROR":
            self.errors += 1
            return
        if kind != "MESSAGE":
            return
        on_a = index < self.subs
        if frame.get("topic") != (TOPIC_A if on_a else TOPIC_B):
            self.foreign += 1
            return
        data = frame.get("data") or ""
        if data.startswith(PROBE):
            if not self.probed[index]:
                self.probed[index] = True
                self.probed_count += 1
                if self.probed_count == len(self.probed):
                    self.all_probed.set()
            return
        if not on_a:
            self.b_received += 1
            return
        self._on_a(index, frame, data)

    def _on_a(self, index: int, frame: Frame, data: str) -> None:
        seq = int(data[:8])
        message_id = frame.get("id")
        if seq != self.next_seq[index] or (isinstance(message_id, int) and message_id <= self.last_id[index]):
            self.out_of_order += 1
        self.next_seq[index] = seq + 1
        if isinstance(message_id, int):
            self.last_id[index] = message_id
        self.counts[index] += 1
        self.delivered += 1
        if self.counts[index] == self.messages:
            self.complete += 1
            if self.complete == self.subs:
                self.t_last = now()
                self.all_complete.set()

    def result(self) -> dict[str, Any]:
        return {
            "t_last": self.t_last,
            "a_total": sum(self.counts),
            "a_min": min(self.counts),
            "a_max": max(self.counts),
            "a_complete_subs": self.complete,
            "out_of_order": self.out_of_order,
            "b_received": self.b_received,
            "foreign": self.foreign,
            "errors": self.errors,
        }


async def subscriber_role(urls: Sequence[str], subs: int, messages: int, timeout: float, lifetime: float) -> None:
    """``subs`` subscribers of A and ``subs`` of B, spread over ``urls``; reports what they received.

    Lines: ``SUBSCRIBED`` once every SUBSCRIBE is confirmed, ``READY`` once each has
    seen a probe message, ``PROGRESS n`` while A's messages arrive, then ``RESULT``.
    """
    tally = FanoutTally(subs, messages)
    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    stop = stop_requested()

    async def subscribe(index: int) -> ClientConnection:
        topic = TOPIC_A if index < subs else TOPIC_B
        async with opening:
            ws = await open_socket(urls[index % len(urls)])
            await ws.send(json.dumps({"type": "SUBSCRIBE", "topic": topic}))
            try:
                await expect(ws, "SUBSCRIBED", SUBSCRIBE_TIMEOUT)
            except BenchError as exc:
                raise BenchError(f"SUBSCRIBE {topic}: {exc}") from exc
            return ws

    async def listen(index: int, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                tally.on_frame(index, json.loads(raw))
        except ConnectionClosed:
            tally.errors += 1

    try:
        sockets = await asyncio.gather(*(subscribe(index) for index in range(2 * subs)))
    except BenchError as exc:
        say("FAILED", str(exc))
        return
    listeners = [asyncio.create_task(listen(index, ws)) for index, ws in enumerate(sockets)]
    say("SUBSCRIBED")
    try:
        await asyncio.wait_for(tally.all_probed.wait(), lifetime)
        say("READY")
        await _report_progress(tally, timeout)
        stopped_waiting = now()
        # A short look past the last expected delivery, to catch duplicates and strays on B.
        await asyncio.sleep(0.5)
        say("RESULT", tally.result() | {"t_end": stopped_waiting})
        await asyncio.wait_for(stop.wait(), lifetime)
    except TimeoutError:
        pass
    for task in listeners:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def _report_progress(tally: FanoutTally, timeout: float) -> None:
    """Say ``PROGRESS n`` every 0.2 s until every subscriber of A has every message, or ``timeout``."""
    deadline = now() + timeout
    while not tally.all_complete.is_set() and now() < deadline:
        say("PROGRESS", str(tally.delivered))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.all_complete.wait(), min(PROGRESS_EVERY, max(0.0, deadline - now())))
    say("PROGRESS", str(tally.delivered))
