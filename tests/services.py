"""Tell whether PostgreSQL and Redis are reachable for the second test pass.

``python -m tests.services`` exits 0 when both answer, 1 when one is missing
on a developer machine (the pass is skipped), and 2 when one is missing under
``CI=true``, where the pass is required.
"""

from __future__ import annotations

import os
import sys

POSTGRES_URL = os.environ.get("TURTLEMQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TURTLEMQ_TEST_REDIS", "redis://127.0.0.1:6379/0")


def missing_services() -> list[str]:
    import psycopg
    import redis

    missing = []
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        missing.append(f"PostgreSQL at {POSTGRES_URL}: {exc}")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        missing.append(f"Redis at {REDIS_URL}: {exc}")
    return missing


def main() -> int:
    missing = missing_services()
    if not missing:
        return 0
    required = os.environ.get("CI", "").lower() == "true"
    for problem in missing:
        print(f"{'required' if required else 'skipping the PostgreSQL + Redis pass'}: {problem} unreachable")
    return 2 if required else 1


if __name__ == "__main__":
    sys.exit(main())
