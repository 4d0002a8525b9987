"""The statements every published message runs, written in SQL by hand.

As on the task path (``broker.sql``, whose runner these use), building these
queries with the ORM cost more than running them: publishing was half of the
broker's time under fan-out load. The same SQL runs on SQLite and
PostgreSQL, inside the caller's transaction, through its :class:`~broker.sql.Runner`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from broker.sql import Runner

from .models import Message, Subscription, Topic

TOPIC = Topic._meta.db_table
MESSAGE = Message._meta.db_table
SUBSCRIPTION = Subscription._meta.db_table


def count_up(run: Runner, name: str, count: int = 1) -> tuple[int, int] | None:
    """Count ``count`` more messages on topic ``name``: (its id, the new last_message_id), or None if no such topic.

    The UPDATE takes the topic's row lock first, so concurrent publishers of a
    topic queue here and their sequence numbers follow their commit order.
    """
    rows = run.rows(
        f"UPDATE {TOPIC} SET last_message_id = last_message_id + %s WHERE name = %s RETURNING id, last_message_id",
        (count, name),
    )
    return rows[0] if rows else None


def insert_messages(run: Runner, topic_id: int, first_seq: int, data: list[str], now: datetime) -> dict[int, int]:
    """Store messages numbered from ``first_seq`` on, one statement; their ids by sequence number."""
    at = run.time(now)
    params: list[Any] = []
    for offset, text in enumerate(data):
        params += (topic_id, first_seq + offset, text, at)
    rows = run.rows(
        f"INSERT INTO {MESSAGE} (topic_id, seq, data, created_at) VALUES"
        f" {', '.join(['(%s, %s, %s, %s)'] * len(data))} RETURNING seq, id",
        params,
    )
    return dict(rows)


def email_recipients(run: Runner, topic_id: int) -> list[tuple[int, str]]:
    """(subscription id, address) of the topic's active e-mail subscriptions."""
    return run.rows(f"SELECT id, address FROM {SUBSCRIPTION} WHERE topic_id = %s AND active", (topic_id,))
