"""System checks of the task broker (``manage.py check``, and before serving)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, register
from django.db import connections


@register("database")
def check_update_returning(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Error]:
    """The hot path (``broker.sql``) needs ``UPDATE ... RETURNING``: SQLite 3.35 or newer, or PostgreSQL."""
    errors = []
    for alias in databases or ():
        connection = connections[alias]
        if connection.vendor not in ("sqlite", "postgresql"):
            errors.append(Error(f"TurtleMQ runs on SQLite or PostgreSQL, not {connection.vendor}", id="broker.E001"))
        elif not connection.features.can_return_columns_from_insert:
            errors.append(
                Error(
                    "TurtleMQ needs UPDATE ... RETURNING: SQLite 3.35 or newer",
                    hint="Use a Python built against a newer SQLite, or PostgreSQL (DATABASE_URL).",
                    id="broker.E002",
                )
            )
    return errors
