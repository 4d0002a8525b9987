"""The ASGI lifespan protocol, for servers that speak it (uvicorn, hypercorn; daphne does not).

On shutdown the server has stopped accepting connections and closed the open
ones; ``BrokerNode.stop`` then marks this process stopped and hands back what
its connections still hold, so that the other processes take it at once.
Under daphne the same happens through ``turtlemq_site.daphne_shutdown``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.node import node

logger = logging.getLogger("turtlemq.broker")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def lifespan(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """Answer startup at once (the node starts with the first registration); stop the node on shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await node.stop()
            except Exception as exc:
                logger.exception("graceful shutdown failed")
                await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            else:
                await send({"type": "lifespan.shutdown.complete"})
            return
