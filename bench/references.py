"""The references of ``make bench``, measured with the shared harness (``../shared/bench/harness.py``).

Each reference is a system the harness drives (``--system ws|rabbitmq|celery``)
and, for the WebSocket relays, a server process this run starts. A reference
whose service or client library is missing is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stacks import SHARED_BENCH, Server, Unavailable, port_open

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Celery's worker in the harness empties its Redis database first: a database
# of its own, never the one the broker's tests share (0).
CELERY_URL = "redis://127.0.0.1:6379/15"


@dataclass
class Reference:
    """A system to measure: its row label, harness system, URL and workloads."""

    label: str
    system: str
    workloads: tuple[str, ...]
    url: str | None = None
    server: Server | None = None  # started by this run; None for a service that is already running


def harness_available() -> None:
    if not (SHARED_BENCH / "harness.py").exists():
        raise Unavailable(f"the harness is not at {SHARED_BENCH}/harness.py")


def check_rabbitmq() -> None:
    if importlib.util.find_spec("aio_pika") is None:
        raise Unavailable("aio-pika is not installed (pip install -r requirements-bench.txt)")
    if not port_open(5672):
        raise Unavailable("no RabbitMQ at 127.0.0.1:5672")


def check_celery() -> None:
    if importlib.util.find_spec("celery") is None:
        raise Unavailable("celery is not installed (pip install -r requirements-bench.txt)")
    if not port_open(6379):
        raise Unavailable("no Redis at 127.0.0.1:6379")


def run_harness(reference: Reference, workload: str, options: dict[str, Any], out: Path) -> dict[str, Any]:
    """One workload of ``reference`` through the harness; its summary, or ``{"error": ...}``."""
    argv = [
        sys.executable, str(SHARED_BENCH / "harness.py"), "--system", reference.system,
        "--workload", workload, "--reps", str(options["reps"]), "--out", str(out), "--label", reference.label,
        "--duration", str(options["duration"]), "--w2-timeout", str(options["timeout"]),
        "--w3-timeout", str(options["timeout"]),
    ]  # fmt: skip
    if reference.url:
        argv += ["--url", reference.url]
    if reference.server is not None:
        argv += ["--broker-pid", str(reference.server.pid)]
    try:
        limit = options["reps"] * (options["timeout"] + 30) + 60
        done = subprocess.run(argv, capture_output=True, text=True, cwd=SHARED_BENCH, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": "the harness did not finish in time"}
    summary = None
    failure = None
    for line in done.stdout.splitlines():
        if line.startswith("SUMMARY "):
            summary = json.loads(line[len("SUMMARY ") :])
        elif line.startswith("{"):
            failure = _rep_problem(json.loads(line)) or failure
    if summary is None:
        return {"error": (done.stderr.strip().splitlines() or [f"harness exited with {done.returncode}"])[-1]}
    if not summary.get("all_ok"):
        summary["error"] = failure or "the harness's checks failed"
    return summary


def _rep_problem(rep: dict[str, Any]) -> str | None:
    """Why a harness repetition failed, in words."""
    if rep.get("ok"):
        return None
    if rep.get("error"):
        return rep["error"]
    if "a_total" in rep:
        to_a, to_b, disorder = rep["a_total"], rep.get("b_received"), rep.get("out_of_order")
        return f"{to_a:,} deliveries to A, {to_b} to B, {disorder} out of order"
    if "correct" in rep:
        return f"{rep['correct']:,} correct results"
    return f"{rep.get('errors')} errors" if rep.get("errors") else None
