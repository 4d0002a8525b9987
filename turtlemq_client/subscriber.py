"""The subscriber: an async iterator over the messages of the topics it follows.

A :class:`Subscriber` follows topic patterns (``news.sports``, ``news.*``,
``news.#``) and remembers the id of the last message it received from each
topic. After a reconnect it first subscribes to each of those topics by name
with ``since`` set to that id, so the broker replays exactly what was
published meanwhile, then to its patterns again (the broker does not replay a
topic a connection already follows). Anything at or below the last id of its
topic is dropped, so nothing arrives twice.

One limit: a topic from which no message has arrived yet has no id to resume
from, and what it got during the outage is not replayed, unless the subscription
asked for ``since`` or the broker's SUBSCRIBED frame says where the topic stood
(an optional ``lastId`` field, used when present).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from .connection import DEFAULT_URL, Backoff, Connection, Frame
from .errors import ConnectionLost

_END = object()  # queued when the connection ends for good


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a topic: its per-topic sequence number and its data."""

    topic: str
    id: int
    data: str


def is_pattern(name: str) -> bool:
    """Whether a subscription names several topics (``*`` or ``#`` words) rather than one."""
    return any(word in ("*", "#") for word in name.split("."))


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` is one of the topics ``pattern`` follows (``*``: one word, ``#``: zero or more)."""
    return _words_match(pattern.split("."), topic.split("."))


def _words_match(pattern: list[str], topic: list[str]) -> bool:
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_words_match(rest, topic[skip:]) for skip in range(len(topic) + 1))
    return bool(topic) and head in ("*", topic[0]) and _words_match(rest, topic[1:])


class Subscriber:
    """Follows topic patterns and yields their messages: ``async for message in subscriber: ...``.

    ``email`` also registers that address for e-mail updates of every initial pattern; ``since`` replays
    the stored messages with a higher id first.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        patterns: str | Iterable[str] = (),
        *,
        email: str | None = None,
        since: int | None = None,
        token: str | None = None,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
    ) -> None:
        self.contents: dict[str, str] = {}  # pattern -> the topic's content when (re)subscribed
        self.last_ids: dict[str, int] = {}  # topic -> id of the last message received
        self._since: dict[str, int | None] = {}  # pattern -> since asked when subscribing first; insertion order
        self._emails: dict[str, str] = {}  # pattern -> address not yet confirmed by the broker
        self._baselines: dict[str, int] = {}  # topic -> its last id when subscribed (SUBSCRIBED.lastId)
        self._resumed: set[str] = set()  # topics subscribed by name after a reconnect, only to resume them
        self._queue: asyncio.Queue[Message | object] = asyncio.Queue()
        self._end: BaseException | None = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            self._since[pattern] = since
            if email:
                self._emails[pattern] = email
        self.connection = Connection(
            url,
            token=token,
            on_open=self._opened,
            on_frame=self._received,
            on_end=self._ended,
            backoff=backoff,
            give_up_after=give_up_after,
        )

    async def start(self) -> Subscriber:
        """Connect and subscribe; raises if the broker refuses a subscription (e.g. :class:`UnknownTopic`)."""
        await self.connection.wait_ready()
        return self

    async def close(self) -> None:
        """Disconnect; iteration ends once the messages already received are consumed."""
        await self.connection.close()

    async def __aenter__(self) -> Subscriber:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Message:
        self.connection.start()
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end too
            if self._end is not None:
                raise self._end
            raise StopAsyncIteration
        assert isinstance(item, Message)
        return item

    async def next_message(self, timeout: float | None = None) -> Message:
        """The next message, waiting at most ``timeout`` seconds (``TimeoutError`` after that)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    # --- subscriptions on the fly ------------------------------------------------------

    async def subscribe(self, pattern: str, *, email: str | None = None, since: int | None = None) -> str:
        """Follow another pattern (registering ``email`` for it too); return the topic's current content."""
        added = pattern not in self._since
        if added:
            self._since[pattern] = since
        frame: Frame = {"type": "SUBSCRIBE", "topic": pattern}
        if email:
            frame["email"] = email
        if since is not None:
            frame["since"] = since
        try:
            reply = await self.connection.request(frame)
        except BaseException:
            if added:
                self._since.pop(pattern, None)
            raise
        self._remember(pattern, reply)
        return self.contents[pattern]

    async def unsubscribe(self, pattern: str, *, email: str | None = None) -> None:
        """Stop following ``pattern``; with ``email``, also remove that address's e-mail subscription."""
        self._since.pop(pattern, None)
        self._emails.pop(pattern, None)
        self.contents.pop(pattern, None)
        frame: Frame = {"type": "UNSUBSCRIBE", "topic": pattern}
        if email:
            frame["email"] = email
        await self.connection.request(frame)
        # Topics subscribed by name only to resume them, and no longer covered by any pattern.
        for topic in sorted(self._resumed):
            if not self._covered(topic):
                self._resumed.discard(topic)
                await self.connection.request({"type": "UNSUBSCRIBE", "topic": topic})

    @property
    def patterns(self) -> list[str]:
        """The patterns followed now."""
        return list(self._since)

    async def publish(self, topic: str, data: str) -> int:
        """Publish on ``topic`` over this subscriber's connection; return the message's id."""
        return await self.connection.publish(topic, data)

    async def list_topics(self) -> list[str]:
        """The broker's topic names."""
        return await self.connection.list_topics()

    # --- connection callbacks --------------------------------------------------------

    def _covered(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self._since)

    async def _opened(self) -> None:
        # 1. Each topic we know an id for, by name, replaying from there. The broker then follows it, and
        # the patterns subscribed next add no replay of their own for it.
        self._resumed.clear()
        resume_points = {**self._baselines, **self.last_ids}
        for topic, last_id in sorted(resume_points.items()):
            if self._covered(topic):
                await self.connection.request({"type": "SUBSCRIBE", "topic": topic, "since": last_id}, opening=True)
                self._resumed.add(topic)
        # 2. The subscriptions themselves (the first time: with their e-mail address and initial since).
        for pattern, since in list(self._since.items()):
            frame: Frame = {"type": "SUBSCRIBE", "topic": pattern}
            email = self._emails.get(pattern)
            if email:
                frame["email"] = email
            if since is not None and pattern not in self._resumed:
                frame["since"] = since
            reply = await self.connection.request(frame, opening=True)
            self._emails.pop(pattern, None)  # registered: a reconnect only needs to follow the topic again
            self._remember(pattern, reply)
        # Patterns followed by name in step 1 stay followed through their own subscription now.
        self._resumed -= set(self._since)

    def _remember(self, pattern: str, reply: Frame) -> None:
        data = reply.get("data")
        self.contents[pattern] = data if isinstance(data, str) else ""
        last_id = reply.get("lastId")
        if isinstance(last_id, int) and not is_pattern(pattern) and pattern not in self.last_ids:
            # The broker told us where the topic stands: resume from there if no message arrives first.
            self._baselines.setdefault(pattern, last_id)

    def _received(self, frame: Frame) -> None:
        if frame.get("type") != "MESSAGE":
            return
        topic, message_id, data = frame.get("topic"), frame.get("id"), frame.get("data")
        if not isinstance(topic, str) or not isinstance(message_id, int) or not isinstance(data, str):
            return
        last = self.last_ids.get(topic)
        if last is not None and message_id <= last:
            return  # replayed after a reconnect, or delivered by two overlapping subscriptions
        self.last_ids[topic] = message_id
        self._queue.put_nowait(Message(topic, message_id, data))

    def _ended(self, reason: BaseException) -> None:
        closed_by_owner = isinstance(reason, ConnectionLost) and self.connection.closed_by_owner
        self._end = None if closed_by_owner else reason
        self._queue.put_nowait(_END)
