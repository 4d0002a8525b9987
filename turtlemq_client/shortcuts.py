"""One-shot calls: open a connection, ask one thing, close it."""

from __future__ import annotations

from typing import Any

from .connection import DEFAULT_URL, Connection

# A one-shot call fails rather than waiting forever for a broker that is down.
ONE_SHOT_GIVE_UP_AFTER = 10.0


async def publish(
    url: str, topic: str, data: str, *, token: str | None = None, give_up_after: float = ONE_SHOT_GIVE_UP_AFTER
) -> int:
    """Publish ``data`` on ``topic`` and return the message's id in that topic."""
    async with Connection(url, token=token, give_up_after=give_up_after) as connection:
        return await connection.publish(topic, data)


async def list_topics(
    url: str = DEFAULT_URL, *, token: str | None = None, give_up_after: float = ONE_SHOT_GIVE_UP_AFTER
) -> list[str]:
    """The broker's topic names, sorted."""
    async with Connection(url, token=token, give_up_after=give_up_after) as connection:
        return await connection.list_topics()


async def status(
    url: str = DEFAULT_URL, *, token: str | None = None, give_up_after: float = ONE_SHOT_GIVE_UP_AFTER
) -> dict[str, Any]:
    """The broker's STATUS counts."""
    async with Connection(url, token=token, give_up_after=give_up_after) as connection:
        return await connection.status()
