"""A small run of ``turtlemq bench`` against a real broker: every workload verifies; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .servers import REPO_ROOT, Stack, embedded_stack

pytestmark = pytest.mark.e2e


def bench(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``python -m turtlemq_client bench --json`` against ``stack``: its exit status and report."""
    command = ["bench", "--json", "--url", stack.client_url, "--timeout", "60", *args]
    done = subprocess.run(
        [sys.executable, "-m", "turtlemq_client", *command],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.stdout, f"no report; stderr:\n{done.stderr}"
    return done.returncode, json.loads(done.stdout)


def require_create_topic(stack: Stack) -> None:
    """Skip until the topics work provides the operator's command that creates topics."""
    try:
        stack.manage("help", "create_topic")
    except subprocess.CalledProcessError:
        pytest.skip("the create_topic management command does not exist yet (topics work not landed)")


@pytest.fixture
def stack(tmp_path: Path):
    with embedded_stack(tmp_path) as running:
        yield running


def test_round_trips_and_burst_get_every_result_once_and_right(stack: Stack) -> None:
    status, report = bench(stack, "--workload", "W1", "--duration", "1", "--warmup", "0.2", "--clients", "4")
    w1 = report["workloads"]["W1"]["reps"][0]
    assert (status, w1["ok"], w1["errors"], w1["unexpected_results"]) == (0, True, 0, 0), w1
    assert w1["n"] > 0 and w1["rt_per_s"] > 0

    status, report = bench(stack, "--workload", "W2", "--tasks", "300")
    w2 = report["workloads"]["W2"]["reps"][0]
    assert (status, w2["ok"], w2["answered"], w2["correct"], w2["unexpected_results"]) == (0, True, 300, 300, 0), w2


def test_fan_out_reaches_every_subscriber_of_a_in_order_and_none_of_b(stack: Stack) -> None:
    require_create_topic(stack)
    stack.manage("create_topic", "A")
    stack.manage("create_topic", "B")
    status, report = bench(stack, "--workload", "W3", "--subs", "5", "--messages", "60")
    w3 = report["workloads"]["W3"]["reps"][0]
    assert status == 0 and w3["ok"], w3
    assert (w3["a_total"], w3["a_complete_subs"], w3["out_of_order"], w3["b_received"]) == (300, 5, 0, 0)


def test_fan_out_without_topics_a_and_b_says_how_to_create_them(stack: Stack) -> None:
    require_create_topic(stack)
    status, report = bench(stack, "--workload", "W3", "--subs", "2", "--messages", "5")
    assert status == 1
    error = report["workloads"]["W3"]["summary"]["error"]
    assert "A and B are missing" in error and "create_topic A` and `python manage.py create_topic B" in error
