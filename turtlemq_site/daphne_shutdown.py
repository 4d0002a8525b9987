"""Graceful shutdown under daphne: on SIGTERM, hand back this process's work before exiting.

Daphne stops on SIGTERM (or SIGINT) by stopping the Twisted reactor, whose
"before shutdown" trigger cancels every application instance at once: the
consumers never learn why, and the tasks their workers hold would wait in the
database until the other processes declare this one dead. Wrapped here, that
trigger first stops listening, then lets the broker node hand everything back
(``BrokerNode.stop``: connections released, their tasks announced to workers of
other processes, the connections closed with 1001), waits up to
``TURTLEMQ_SHUTDOWN_GRACE`` seconds for the consumers to finish, and only then
cancels whatever is left. Other ASGI servers reach the same ``stop`` through
the lifespan protocol (``turtlemq_site.lifespan``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from django.conf import settings
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort

from broker.node import node

logger = logging.getLogger("turtlemq.broker")

CLOSE_GOING_AWAY = 1001


def install() -> None:
    """Wrap daphne's shutdown trigger once; harmless when another server runs the app."""
    if getattr(Server, "_turtlemq_shutdown", False):
        return
    kill_all_applications = Server.kill_all_applications

    def shut_down_gracefully(server: Server) -> defer.Deferred:
        # A fresh context: the trigger runs in whatever context the signal
        # interrupted, possibly one in the middle of a database_sync_to_async
        # call, whose deadlock guard would then refuse the node's own calls.
        task = asyncio.get_event_loop().create_task(_leave(server), context=contextvars.Context())
        leaving = defer.Deferred.fromFuture(task)
        leaving.addErrback(lambda failure: logger.error("graceful shutdown failed: %s", failure.getTraceback()))
        leaving.addBoth(lambda _: kill_all_applications(server))
        return leaving

    Server.kill_all_applications = shut_down_gracefully
    Server._turtlemq_shutdown = True


async def _leave(server: Server) -> None:
    from twisted.internet import reactor

    # Stop accepting connections first, so that no peer registers while the work is handed back.
    for reader in reactor.getReaders():
        if IListeningPort.providedBy(reader):
            reader.stopListening()
    await node.stop()
    # The node closed the connections it knows from the database; close the
    # unregistered ones too (their consumers still finish their frames).
    for protocol in list(server.connections):
        if isinstance(protocol, WebSocketProtocol) and protocol.state == WebSocketProtocol.STATE_OPEN:
            protocol.serverClose(code=CLOSE_GOING_AWAY)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.TURTLEMQ_SHUTDOWN_GRACE
    while loop.time() < deadline and any(_running(details) for details in server.connections.values()):
        await asyncio.sleep(0.05)


def _running(details: dict) -> bool:
    instance = details.get("application_instance")
    return instance is not None and not instance.done()
