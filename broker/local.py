"""This process's live connections by channel name, to deliver events without the channel layer.

A routing cache only: it maps a channel name to the consumer that reads it in
this process, nothing more. Every event delivered through it is one the
database already holds (a committed assignment or outcome), so a connection
missing from it only means the event takes the channel layer instead.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

logger = logging.getLogger("turtlemq.broker")


class Reader(Protocol):
    async def dispatch(self, message: dict[str, Any]) -> None: ...


_connections: dict[str, Reader] = {}


def register(channel: str, reader: Reader) -> None:
    """``reader`` (a consumer of this process) now reads ``channel``."""
    _connections[channel] = reader


def unregister(channel: str) -> None:
    _connections.pop(channel, None)


async def deliver(channel: str, event: dict[str, Any]) -> bool:
    """Hand ``event`` to the consumer of ``channel`` if it lives in this process; False if it does not."""
    reader = _connections.get(channel)
    if reader is None:
        return False
    try:
        await reader.dispatch(event)
    except Exception:
        # Its connection is closing: the database still owes the event (a
        # released task is re-queued, an undelivered outcome re-sent on resume).
        logger.warning("could not deliver %s to %s in-process", event.get("type"), channel, exc_info=True)
    return True
