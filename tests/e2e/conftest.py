"""Fixtures of the end-to-end tests: real broker processes on both stacks.

``stack`` runs a test on the embedded default and on PostgreSQL + Redis;
``two_process_stack`` only on the latter, for tests about several broker
processes. Mark a test ``@pytest.mark.stack_env(NAME="value")`` to start its
broker processes with extra environment variables.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import Stack, embedded_stack, postgres_redis_stack

STACKS = {"embedded": embedded_stack, "postgres_redis": postgres_redis_stack}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stack_env(**env): extra environment variables of the test's broker processes")


def _extra_env(request: pytest.FixtureRequest) -> dict[str, str]:
    marker = request.node.get_closest_marker("stack_env")
    return {name: str(value) for name, value in marker.kwargs.items()} if marker else {}


@pytest.fixture(params=list(STACKS))
def stack(request: pytest.FixtureRequest, tmp_path) -> Iterator[Stack]:
    """Every end-to-end test runs on the embedded default and on PostgreSQL + Redis."""
    with STACKS[request.param](tmp_path, _extra_env(request)) as running:
        yield running


@pytest.fixture
def two_process_stack(request: pytest.FixtureRequest, tmp_path) -> Iterator[Stack]:
    """PostgreSQL + Redis shared by two broker processes: clients on the first, workers on the second."""
    with postgres_redis_stack(tmp_path, _extra_env(request)) as running:
        yield running
