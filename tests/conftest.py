"""Shared fixtures of the test suite."""

from __future__ import annotations

import pytest

from broker.node import node


@pytest.fixture(autouse=True)
async def _fresh_broker_node():
    """Each test runs in its own event loop and database: start the node afresh."""
    yield
    await node.stop()
