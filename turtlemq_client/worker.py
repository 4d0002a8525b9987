"""The worker: run a handler for each task the broker assigns, answer with its result.

A handler takes the task's data (a string) and returns the result (a string):
an ``async def`` runs on the event loop, a plain function in a thread of the
worker's own pool (one thread per concurrency slot, so that a busy default
executor never throttles it). An exception becomes FAIL_TASK, and the broker
retries the task until its attempt limit. When the connection drops, the
broker puts the tasks this worker held back on its queue: the worker cancels
their async handlers, drops any result that arrives late, and re-registers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .connection import DEFAULT_MAX_FRAME_BYTES, DEFAULT_URL, Backoff, Connection, Frame
from .errors import TaskError

logger = logging.getLogger("turtlemq_client")

Handler = Callable[[str], str | Awaitable[str]]


def _is_async(handler: Handler) -> bool:
    # Also an object whose __call__ is an ``async def``.
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)


def failure_text(exc: BaseException) -> str:
    """What FAIL_TASK reports for an exception raised by a handler."""
    if isinstance(exc, TaskError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Worker:
    """Takes tasks from the broker, at most ``concurrency`` at a time, and runs ``handler`` on each.

    ``await worker.run()`` works until :meth:`stop` is called (or the task is cancelled);
    ``async with Worker(...)`` runs it in the background for the block's duration.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        handler: Handler | None = None,
        *,
        concurrency: int = 1,
        token: str | None = None,
        touch_every: float | None = None,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
        max_frame_bytes: int | None = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        if handler is None:
            raise TypeError("a Worker needs a handler")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.handler = handler
        self.concurrency = concurrency
        self.touch_every = touch_every  # seconds between TOUCH_TASKs that renew a running task's lease
        self._async = _is_async(handler)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: dict[tuple[int, str], asyncio.Task[None]] = {}  # (generation, taskId) -> its handler
        self.connection = Connection(
            url,
            token=token,
            on_open=self._opened,
            on_frame=self._received,
            on_close=self._closed,
            backoff=backoff,
            give_up_after=give_up_after,
            max_frame_bytes=max_frame_bytes,
        )

    async def start(self) -> Worker:
        """Connect and register in the background; return once registered."""
        await self.connection.wait_ready()
        return self

    async def run(self) -> None:
        """Work until :meth:`stop`; raises if the broker refuses the worker or the connection gives up."""
        try:
            await self.connection.wait_ended()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Disconnect (the broker requeues what this worker held) and cancel running handlers."""
        await self.connection.close()
        self._cancel_running()
        if self._executor is not None:
            # Threads cannot be interrupted; their results are dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def busy(self) -> int:
        """How many tasks the worker is running now."""
        return len(self._running)

    # --- connection callbacks --------------------------------------------------------

    async def _opened(self) -> None:
        frame = {"type": "REGISTER_WORKER", "data": "", "concurrency": self.concurrency}
        await self.connection.request(frame, opening=True)

    def _received(self, frame: Frame) -> None:
        if frame.get("type") == "REQUEST_TASK":
            task_id, data = frame.get("taskId"), frame.get("data")
            if not isinstance(task_id, str) or not isinstance(data, str):
                logger.warning("ignoring a malformed REQUEST_TASK: %.200r", frame)
                return
            key = (self.connection.generation, task_id)
            if key in self._running:
                return  # the broker reminding us of a task we are already running (its rule 4)
            self._running[key] = asyncio.create_task(self._work(key, data), name=f"turtlemq task {task_id}")
        elif frame.get("type") == "ERROR":
            logger.warning("the broker reported %s: %s (%s)", frame.get("code"), frame.get("message"), frame.get("ref"))

    def _closed(self) -> None:
        # The broker has taken these tasks back already; their results could not be delivered.
        self._cancel_running()

    def _cancel_running(self) -> None:
        running, self._running = self._running, {}
        for task in running.values():
            task.cancel()

    # --- running one task ---------------------------------------------------------------

    async def _work(self, key: tuple[int, str], data: str) -> None:
        generation, task_id = key
        toucher = asyncio.create_task(self._touch(generation, task_id)) if self.touch_every else None
        try:
            try:
                result = await self._call(data)
                reply: Frame = {"type": "RESPONSE_TASK", "taskId": task_id, "data": result}
                self.connection.encode(reply)  # a result too large to send fails the task instead
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("task %s failed: %s", task_id, failure_text(exc))
                reply = {"type": "FAIL_TASK", "taskId": task_id, "data": failure_text(exc)}
            finally:
                if toucher is not None:
                    toucher.cancel()
            # Only on the socket that received the task: on a new one the broker would not know it.
            await self.connection.send(reply, generation=generation, opening=True)
        finally:
            if self._running.get(key) is asyncio.current_task():
                del self._running[key]

    async def _call(self, data: str) -> str:
        if self._async:
            result: Any = await self.handler(data)  # type: ignore[misc]
        else:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="turtlemq-worker"
                )
            call = functools.partial(contextvars.copy_context().run, self.handler, data)
            result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
            if inspect.isawaitable(result):
                result = await result
        if result is None:
            return ""
        return result if isinstance(result, str) else str(result)

    async def _touch(self, generation: int, task_id: str) -> None:
        assert self.touch_every is not None
        while True:
            await asyncio.sleep(self.touch_every)
            await self.connection.send({"type": "TOUCH_TASK", "taskId": task_id}, generation=generation, opening=True)
