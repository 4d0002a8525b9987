"""The statements every published message runs, written in SQL by hand.

As on the task path (``broker.sql``, whose runner these use), building these
queries with the ORM cost more than running them: publishing was half of the
broker's time under fan-out load. The same SQL runs on SQLite and
PostgreSQL, inside the caller's transaction, through its :class:`~broker.sql.Runner`.
"""

from __future__ import annotations

from datetime import datetime

from broker.sql import Runner

from .models import Message, Subscription, Topic

TOPIC = Topic._meta.db_table
MESSAGE = Message._meta.db_table
SUBSCRIPTION = Subscription._meta.db_table


def next_seq(run: Runner, name: str) -> tuple[int, int] | None:
    """Count one more message on topic ``name``: its (id, new last_message_id), or None if there is no such topic.

    The UPDATE takes the topic's row lock first, so concurrent publishers of a
    topic queue here and their sequence numbers follow their commit order.
    """
    rows = run.rows(
        f"UPDATE {TOPIC} SET last_message_id = last_message_id + 1 WHERE name = %s RETURNING id, last_message_id",
        (name,),
    )
    return rows[0] if rows else None


def insert_message(run: Runner, topic_id: int, seq: int, data: str, now: datetime) -> int:
    """Store a message; its id."""
    ((pk,),) = run.rows(
        f"INSERT INTO {MESSAGE} (topic_id, seq, data, created_at) VALUES (%s, %s, %s, %s) RETURNING id",
        (topic_id, seq, data, run.time(now)),
    )
    return pk


def email_recipients(run: Runner, topic_id: int) -> list[tuple[int, str]]:
    """(subscription id, address) of the topic's active e-mail subscriptions."""
    return run.rows(f"SELECT id, address FROM {SUBSCRIPTION} WHERE topic_id = %s AND active", (topic_id,))
