"""Lines of standard input for asyncio code, read by a daemon thread.

A daemon thread (rather than ``asyncio.to_thread``) so that a pending read
never keeps the process alive at exit, and no platform-specific pipe handling
is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from typing import TextIO

_EOF = None


class Lines:
    """An async iterator over the lines of a text stream, without their line endings."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdin
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._done = False
        threading.Thread(target=self._pump, name="turtlemq-stdin", daemon=True).start()

    def _pump(self) -> None:
        # RuntimeError: the loop is closed, so nobody is reading any more.
        with contextlib.suppress(RuntimeError):
            try:
                for line in self._stream:
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, line.rstrip("\r\n"))
            finally:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, _EOF)

    async def readline(self) -> str | None:
        """The next line, or ``None`` at the end of the stream."""
        if self._done:
            return None
        line = await self._queue.get()
        if line is _EOF:
            self._done = True
        return line

    def __aiter__(self) -> Lines:
        return self

    async def __anext__(self) -> str:
        line = await self.readline()
        if line is None:
            raise StopAsyncIteration
        return line
