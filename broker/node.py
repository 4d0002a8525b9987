"""This broker process as the database knows it, and its housekeeping loop.

The first connection that registers in an event loop records the process
(``BrokerProcess``) and starts a loop that, every ``TURTLEMQ_TICK`` seconds,
beats the heartbeat, takes back the work of dead processes, expires leases and
dispatches retries whose backoff has passed. The only thing kept in memory
is the process's own id; every piece of broker state stays in the database.
"""

from __future__ import annotations

import asyncio
import logging
import os

from channels.db import database_sync_to_async
from django.conf import settings

from . import dispatch, events

logger = logging.getLogger("turtlemq.broker")


class BrokerNode:
    """The identity of this process and its periodic housekeeping."""

    def __init__(self) -> None:
        self.process_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Task[int] | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def ensure_started(self) -> int:
        """Return this process's id, registering it on first use in this event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or (self._started is not None and self._started.done() and self._started.exception()):
            # A new event loop (a new server, or a new test) means a new process row.
            self._loop = loop
            self._started = loop.create_task(self._start())
        assert self._started is not None
        return await asyncio.shield(self._started)

    async def _start(self) -> int:
        process_id, effects = await database_sync_to_async(dispatch.register_process)(dispatch.this_host(), os.getpid())
        self.process_id = process_id
        logger.info("broker process #%s started (pid %s)", process_id, os.getpid())
        await events.ring(effects)
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep_forever(process_id))
        return process_id

    async def _housekeep_forever(self, process_id: int) -> None:
        while True:
            await asyncio.sleep(settings.TURTLEMQ_TICK)
            try:
                effects = await database_sync_to_async(dispatch.housekeep)(process_id)
                await events.ring(effects)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed round is retried at the next tick; never kill the loop.
                logger.exception("housekeeping of broker process #%s failed", process_id)

    async def stop(self) -> None:
        """Stop housekeeping and release what this process's connections hold."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self.process_id is not None and self._loop is asyncio.get_running_loop():
            effects = await database_sync_to_async(dispatch.stop_process)(self.process_id)
            await events.ring(effects)
        self.process_id = None
        self._loop = None
        self._started = None


node = BrokerNode()
