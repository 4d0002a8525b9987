"""This broker process as the database knows it, and its housekeeping loop.

The first connection that registers in an event loop records the process
(``BrokerProcess``) and starts a loop that, every ``TURTLEMQ_TICK`` seconds,
beats the heartbeat, takes back the work of dead processes, expires leases,
requeues orphans and dispatches retries whose backoff has passed. The only
thing kept in memory is the process's own id; every piece of broker state
stays in the database.

Two ways out of service, both ending with this process's connections closed
(1001, so that their peers reconnect) and their work handed to the others:

* :meth:`BrokerNode.stop` on shutdown (SIGTERM under daphne, the ASGI
  lifespan under other servers): no registration is accepted afterwards.
* The heartbeat finds that the others declared this process dead (it was
  paused or cut off for longer than ``TURTLEMQ_PROCESS_DEAD_AFTER``) and
  released its connections: the peers of those connections must not go on as
  if nothing happened, so they are closed and the process registers afresh.
"""

from __future__ import annotations

import asyncio
import logging
import os

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from subscriptions.fanout import stop_process_fanout

from . import commits, dispatch, events, inbox

logger = logging.getLogger("turtlemq.broker")

register_process = database_sync_to_async(dispatch.register_process)
housekeep = database_sync_to_async(dispatch.housekeep)
stop_process = database_sync_to_async(dispatch.stop_process)
channels_to_close = database_sync_to_async(dispatch.channels_to_close)


class NodeStopped(RuntimeError):
    """This broker process is shutting down and registers no more connections."""


class BrokerNode:
    """The identity of this process and its periodic housekeeping."""

    def __init__(self) -> None:
        self.process_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopped = False

    async def ensure_started(self) -> int:
        """Return this process's id, registering it on first use in this event loop.

        Raises :class:`NodeStopped` once :meth:`stop` ran in this event loop.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop or (self._started is not None and self._started.done() and self._started.exception()):
            # A new event loop (a new server, or a new test) means a new process row.
            self._loop = loop
            self._stopped = False
            self._started = loop.create_task(self._start())
        if self._stopped:
            raise NodeStopped("this broker process is shutting down")
        assert self._started is not None
        await asyncio.shield(self._started)
        assert self.process_id is not None
        return self.process_id

    async def _start(self) -> None:
        await self._register()
        layer = get_channel_layer()
        if inbox.supported(layer):
            await inbox.start(layer)  # task events from the other processes
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep_forever())

    async def _register(self) -> None:
        process_id, effects = await register_process(dispatch.this_host(), os.getpid())
        self.process_id = process_id
        logger.info("broker process #%s started (pid %s)", process_id, os.getpid())
        await events.ring(effects)

    async def _housekeep_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.TURTLEMQ_TICK)
            process_id = self.process_id
            assert process_id is not None
            try:
                try:
                    await events.ring(await housekeep(process_id))
                except dispatch.ProcessStopped:
                    await self._rejoin(process_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed round is retried at the next tick; never kill the loop.
                logger.exception("housekeeping of broker process #%s failed", process_id)

    async def _rejoin(self, old_id: int) -> None:
        """The others declared this process dead: close what it served under ``old_id`` and start afresh."""
        logger.warning(
            "broker process #%s was declared dead (silent for over %g s): closing its connections, registering again",
            old_id,
            settings.TURTLEMQ_PROCESS_DEAD_AFTER,
        )
        # The new id first: connections registering from now on belong to it,
        # and those that registered under the old one are among the closed.
        await self._register()
        await self._leave(old_id)

    async def _leave(self, process_id: int) -> None:
        """Release the connections of ``process_id``, announce their tasks elsewhere, close them."""
        await events.ring(await stop_process(process_id))
        await events.going_away(await channels_to_close(process_id))

    async def stop(self) -> None:
        """Stop housekeeping, hand back what this process's connections hold, and close them."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._loop is asyncio.get_running_loop():
            self._stopped = True
            if self._started is not None and not self._started.done():
                await asyncio.wait([self._started])
            if self.process_id is not None:
                await self._leave(self.process_id)
                logger.info("broker process #%s stopped", self.process_id)
        await inbox.stop()
        await commits.close_group_commit()
        # Also when only subscribers were served (the node starts with the first client or worker).
        await stop_process_fanout()  # its reader ends, its process channel leaves the topics' groups
        self.process_id = None
        self._started = None


node = BrokerNode()
