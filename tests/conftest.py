"""Shared fixtures of the test suite."""

from __future__ import annotations

import pytest

from broker.node import node
from tests.communicators import Peers


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """Close database connections after each use in tests.

    Consumers reach the database from an executor thread; a persistent
    connection left there would keep the test database from being dropped.
    """
    from django.conf import settings

    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0


@pytest.fixture(autouse=True)
async def _fresh_broker_node():
    """Each test runs in its own event loop and database: start the node afresh."""
    yield
    await node.stop()


@pytest.fixture
async def peers():
    """In-process clients and workers (``tests.communicators``), closed after the test."""
    opened = Peers()
    yield opened
    await opened.close_all()
