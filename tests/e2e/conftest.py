"""Fixtures of the end-to-end tests: real broker processes on both stacks."""

from __future__ import annotations

import pytest

from .servers import Stack, embedded_stack, postgres_redis_stack

STACKS = {"embedded": embedded_stack, "postgres_redis": postgres_redis_stack}


@pytest.fixture(params=list(STACKS))
def stack(request: pytest.FixtureRequest, tmp_path) -> Stack:
    """Every end-to-end test runs on the embedded default and on PostgreSQL + Redis."""
    with STACKS[request.param](tmp_path) as running:
        yield running
