"""``turtlemq bench`` checks what it measures: a broker that answers wrongly fails the run.

The brokers here are tiny in-test WebSocket servers that break one rule each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from bench.report import Row
from bench.run import Budget, Contender, median_figures, run_rounds
from turtlemq_client.bench import percentile, summarize

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def broker(handler: Handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"


async def run_bench(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turtlemq_client", "bench", "--json", "--url", url, "--timeout", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert out, err.decode()
    return process.returncode or 0, json.loads(out)


def answering(transform: Callable[[str], list[str]]) -> Handler:
    """A broker that answers each REQUEST_TASK itself with the RESPONSE_TASK data ``transform`` gives."""

    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] in ("REGISTER_CLIENT", "REGISTER_WORKER"):
                await ws.send(raw)
            elif frame["type"] == "REQUEST_TASK":
                for data in transform(frame["data"]):
                    await ws.send(json.dumps({"type": "RESPONSE_TASK", "messageId": frame["messageId"], "data": data}))

    return handler


async def test_a_burst_with_results_not_upper_cased_is_not_verified() -> None:
    async with broker(answering(lambda data: [data])) as url:
        status, report = await run_bench(url, "--workload", "W2", "--tasks", "50")
    w2 = report["workloads"]["W2"]["reps"][0]
    assert (status, w2["ok"], w2["answered"], w2["correct"]) == (1, False, 50, 0)
    assert "50 of 50 results missing or wrong" in w2["first_error"]


async def test_a_result_delivered_twice_is_not_verified() -> None:
    async with broker(answering(lambda data: [data.upper(), data.upper()])) as url:
        status, report = await run_bench(url, "--workload", "W2", "--tasks", "20")
    w2 = report["workloads"]["W2"]["reps"][0]
    assert (status, w2["ok"], w2["correct"]) == (1, False, 20)
    assert w2["unexpected_results"] >= 20


async def test_a_correct_broker_is_verified() -> None:
    async with broker(answering(lambda data: [data.upper()])) as url:
        status, report = await run_bench(url, "--workload", "W2", "--tasks", "50")
    assert (status, report["ok"], report["workloads"]["W2"]["reps"][0]["correct"]) == (0, True, 50)


async def test_a_broker_without_topics_fails_fan_out_with_the_reason() -> None:
    async def no_topics(ws: ServerConnection) -> None:
        async for raw in ws:
            if json.loads(raw)["type"] == "LIST_TOPICS":
                await ws.send(json.dumps({"type": "TOPICS", "data": ["A"]}))

    async with broker(no_topics) as url:
        status, report = await run_bench(url, "--workload", "W3")
    assert status == 1
    error = report["workloads"]["W3"]["summary"]["error"]
    assert "B is missing" in error and "create_topic B" in error


def test_percentiles_are_the_harness_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert (percentile(values, 50), percentile(values, 99), percentile([7.0], 99)) == (500.0, 990.0, 7.0)


def test_summary_is_the_median_and_fails_when_one_repetition_failed() -> None:
    reps = [{"tasks_per_s": 10.0, "ok": True}, {"tasks_per_s": 30.0, "ok": True}, {"ok": False, "error": "boom"}]
    assert summarize("W2", reps) == {"tasks_per_s": 20.0, "ok": False, "error": "boom"}


# --- make bench: rounds through every system (bench/run.py) ------------------------------------


class RecordingContender(Contender):
    """A contender that answers at once and writes down when it was measured."""

    def __init__(self, name: str, calls: list[tuple[str, str]], workloads=("W1", "W2", "W3")) -> None:
        super().__init__(Row(name, name), workloads)
        self.calls = calls

    def once(self, workload: str, options: argparse.Namespace) -> dict[str, Any]:
        self.calls.append((self.row.key, workload))
        return {"rt_per_s": float(len(self.calls)), "ok": True}


def test_make_bench_measures_every_system_once_per_round_in_alternating_order_then_w3() -> None:
    calls: list[tuple[str, str]] = []
    contenders = [RecordingContender("a", calls), RecordingContender("b", calls, workloads=("W1", "W2"))]
    options = argparse.Namespace(reps=2, duration=1.0, timeout=1.0)

    run_rounds(contenders, options, Budget(3600))

    assert calls == [
        ("a", "W1"), ("a", "W2"), ("b", "W1"), ("b", "W2"),  # round 1
        ("b", "W1"), ("b", "W2"), ("a", "W1"), ("a", "W2"),  # round 2, the other way round
        ("a", "W3"),  # once, after the rounds; b has none
    ]  # fmt: skip


def test_make_bench_skips_what_the_time_budget_leaves_no_room_for_and_says_so() -> None:
    calls: list[tuple[str, str]] = []
    contender = RecordingContender("a", calls)

    run_rounds([contender], argparse.Namespace(reps=3, duration=5.0, timeout=30.0), Budget(0))

    assert calls == []
    assert "W1: some repetitions skipped (time budget)" in contender.notes
    assert "W3 skipped: time budget" in contender.notes


def test_make_bench_shows_the_median_of_the_rounds_verified_only_if_every_round_was() -> None:
    reps = [
        {"rt_per_s": 100.0, "p99_ms": 9.0, "ok": True},
        {"rt_per_s": 300.0, "p99_ms": 3.0, "ok": True},
        {"rt_per_s": 200.0, "p99_ms": 5.0, "all_ok": False, "error": "3 errors"},
    ]
    assert median_figures(reps) == {
        "rt_per_s": 200.0, "p99_ms": 5.0, "ok": False, "timed_out": False, "error": "3 errors"
    }  # fmt: skip
    assert median_figures(reps[:2])["ok"] is True
