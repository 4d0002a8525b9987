"""The chaos run of ``make chaos``, smaller: 300 tasks while workers and a broker process are SIGKILLed
and the brokers' database connections cut.

It runs ``scripts/chaos.py`` as ``make chaos`` does (two broker processes on
a fresh PostgreSQL database and Redis prefix), with fewer clients, workers and
tasks, and asserts on its verdict and printed counts.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from .servers import POSTGRES_ADMIN_DSN, REDIS_URL, REPO_ROOT, service_missing

pytestmark = pytest.mark.e2e

EXIT_SERVICES_MISSING = 77  # scripts/chaos.py: PostgreSQL or Redis not reachable


async def test_every_task_gets_exactly_one_correct_result_while_workers_a_broker_and_its_database_links_die() -> None:
    command = [
        sys.executable, "scripts/chaos.py",
        "--tasks", "300", "--clients", "4", "--workers", "4",
        "--worker-kills", "2", "--broker-kills", "1", "--db-cuts", "2", "--deadline", "90",
    ]  # fmt: skip
    env = {"TURTLEMQ_TEST_POSTGRES": POSTGRES_ADMIN_DSN, "TURTLEMQ_TEST_REDIS": REDIS_URL}
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=REPO_ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    if done.returncode == EXIT_SERVICES_MISSING:
        service_missing(done.stdout.strip())
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "clients: 300 submitted, 300 with exactly one correct result, 0 wrong, 0 missing, 0 failed" in report
    assert "done 300, queued 0, assigned 0, failed 0" in report
    assert "SIGKILL broker process B" in report and report.count("SIGKILL worker") == 2, report
    assert report.count("database connections of the brokers") == 2, report
    assert "hangs on" in report and "chaos: PASS" in report, report
