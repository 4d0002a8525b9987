"""The task client: submit data, get the worker's result back.

A :class:`Client` registers with a ``clientId`` (a random one unless given),
so that after a reconnect the broker recognises it: the client re-registers
with the same id and sends REQUEST_TASK again for every submission still
pending. The broker never creates a second task for a ``messageId`` it already
has within that ``clientId`` and sends the stored result of finished ones, and
the client resolves each submission once, so a result is neither lost nor
delivered twice across a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from .connection import DEFAULT_MAX_FRAME_BYTES, DEFAULT_URL, Backoff, Connection, Frame
from .errors import ConnectionLost, TaskFailed, error_from_frame

logger = logging.getLogger("turtlemq_client")


@dataclass
class _Submission:
    frame: Frame
    future: asyncio.Future[str]
    sent_in: int = 0  # the connection generation the REQUEST_TASK was last sent on


class Client:
    """Submits tasks to the broker; any number may be in flight at once.

    Use it as ``async with Client(url) as client: result = await client.submit("data")``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        client_id: str | None = None,
        token: str | None = None,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
        max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        # A random id still makes reconnects safe; a stable one also survives a restart of this process.
        self.client_id = client_id or f"py-{uuid.uuid4().hex}"
        self._submissions: dict[str, _Submission] = {}
        self.connection = Connection(
            url,
            token=token,
            on_open=self._opened,
            on_frame=self._received,
            on_end=self._ended,
            backoff=backoff,
            give_up_after=give_up_after,
            max_frame_bytes=max_frame_bytes,
        )

    async def start(self) -> Client:
        """Connect and register; raises if the broker refuses the registration."""
        await self.connection.wait_ready()
        return self

    async def close(self) -> None:
        """Disconnect for good; submissions still pending raise :class:`ConnectionLost`."""
        await self.connection.close()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """How many submissions are waiting for their result."""
        return len(self._submissions)

    async def submit(
        self,
        data: str,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        message_id: str | None = None,
    ) -> str:
        """Submit a task and return its result once a worker has answered.

        ``timeout`` is the task's lease in seconds (how long a worker may hold it), ``max_attempts``
        its retry limit. A task that runs out of attempts raises :class:`TaskFailed`; a frame the broker
        refuses raises its :class:`~turtlemq_client.errors.BrokerError`. ``message_id`` defaults to a
        fresh unique id; pass a stable one (with a stable ``client_id``) to make a submission
        idempotent across restarts of this process.
        """
        if not isinstance(data, str):
            raise TypeError(f"task data must be a string, not {type(data).__name__}")
        message_id = message_id or uuid.uuid4().hex
        if message_id in self._submissions:
            raise ValueError(f"message id {message_id!r} is already pending")
        frame: Frame = {"type": "REQUEST_TASK", "messageId": message_id, "data": data}
        if timeout is not None:
            frame["timeout"] = timeout
        if max_attempts is not None:
            frame["maxAttempts"] = max_attempts
        self.connection.encode(frame)  # refuse an oversized task here rather than have the broker close on us
        if self.connection.closed:
            await self.connection.wait_ready()  # raises why the connection ended
        self.connection.start()

        submission = _Submission(frame, asyncio.get_running_loop().create_future())
        self._submissions[message_id] = submission
        try:
            generation = self.connection.generation
            if self.connection.ready and await self.connection.send(frame, generation=generation):
                submission.sent_in = generation
            # Otherwise the connection is (re)opening, and _opened sends it.
            return await submission.future
        finally:
            if self._submissions.get(message_id) is submission:
                del self._submissions[message_id]

    async def status(self) -> dict[str, Any]:
        """The broker's STATUS counts."""
        return await self.connection.status()

    # --- connection callbacks --------------------------------------------------------

    async def _opened(self) -> None:
        await self.connection.request({"type": "REGISTER_CLIENT", "data": "", "clientId": self.client_id}, opening=True)
        # Results that finished while we were away arrive right after the echo. Then re-send every
        # submission not yet sent on this socket, in submission order, including any made meanwhile.
        generation = self.connection.generation
        while unsent := [s for s in self._submissions.values() if s.sent_in != generation]:
            for submission in unsent:
                if not submission.future.done() and not await self.connection.send(submission.frame, opening=True):
                    raise ConnectionLost("the connection closed while re-sending tasks")
                submission.sent_in = generation

    def _received(self, frame: Frame) -> None:
        frame_type = frame.get("type")
        if frame_type in ("RESPONSE_TASK", "TASK_FAILED"):
            message_id = frame.get("messageId")
            submission = self._submissions.get(message_id) if isinstance(message_id, str) else None
            if submission is None or submission.future.done():
                return  # a repeat of a result already delivered (resume, or a re-sent REQUEST_TASK)
            data = frame.get("data")
            data = data if isinstance(data, str) else ""
            if frame_type == "RESPONSE_TASK":
                submission.future.set_result(data)
            else:
                submission.future.set_exception(TaskFailed(str(message_id), data))
        elif frame_type == "ERROR":
            ref = frame.get("ref") if isinstance(frame.get("ref"), dict) else {}
            message_id = ref.get("messageId")
            submission = self._submissions.get(message_id) if isinstance(message_id, str) else None
            if submission is not None and not submission.future.done():
                submission.future.set_exception(error_from_frame(frame))
            else:
                logger.warning("the broker reported %s: %s", frame.get("code"), frame.get("message"))

    def _ended(self, reason: BaseException) -> None:
        for submission in self._submissions.values():
            if not submission.future.done():
                submission.future.set_exception(reason)
