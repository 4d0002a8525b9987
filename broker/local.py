"""This process's live connections by channel name, to deliver task events without the channel layer.

A routing cache only: it maps a channel name to the consumer that reads it in
this process, nothing more. Every event delivered through it is one the
database already holds (a committed assignment or outcome), so a connection
missing from it only means the event takes the channel layer instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .dispatch import Assignment, Outcome

logger = logging.getLogger("turtlemq.broker")


class Peer(Protocol):
    """What a consumer of this process offers to the announcer of a batch."""

    async def send_assignment(self, assignment: Assignment) -> None: ...

    async def send_outcome(self, outcome: Outcome) -> None: ...


_connections: dict[str, Peer] = {}


def register(channel: str, peer: Peer) -> None:
    """``peer`` (a consumer of this process) now reads ``channel``."""
    _connections[channel] = peer


def unregister(channel: str) -> None:
    _connections.pop(channel, None)


def peer(channel: str) -> Peer | None:
    """The consumer of ``channel`` if it lives in this process."""
    return _connections.get(channel)


async def deliver(channel: str, sending: Awaitable[None], what: str) -> None:
    """Await a send to a local peer; a connection that is closing meanwhile only loses a doorbell."""
    try:
        await sending
    except Exception:
        # The database still owes the event (a released task is re-queued,
        # an undelivered outcome re-sent on resume).
        logger.warning("could not deliver %s to %s in-process", what, channel, exc_info=True)
