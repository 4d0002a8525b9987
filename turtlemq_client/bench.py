"""``turtlemq bench``: the three workloads of the reference harness against any broker URL, every answer checked.

W1  closed-loop round trips: 16 client connections, each submitting a task and
    awaiting its result in a loop, for ``--duration`` seconds after a warm-up;
    4 worker connections in a separate process upper-case the data.
    -> round trips/s, p50/p99 latency.
W2  a burst: one client connection submits ``--tasks`` (5,000) at once and waits
    for every result (same 4 workers). -> tasks/s, first send to last result.
W3  fan-out: ``--subs`` (100) subscribers of topic A and as many of B in a
    separate process; ``--messages`` (1,000) published to A. -> deliveries/s,
    first publish to the last subscriber's last message. Topics A and B must exist.

Results must equal the upper-cased data, each task answered once; every
subscriber of A must get every message once and in order, B none. The frames
are those of ``harness.py --system ws`` (see :mod:`.bench_peers`), so the
figures compare with the references measured by the harness in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO

from .bench_peers import (
    PROBE,
    TOPIC_A,
    TOPIC_B,
    BenchError,
    Publisher,
    RpcClient,
    now,
    subscriber_role,
    task_payload,
    topic_payload,
    worker_role,
)
from .connection import url_with_token

WORKLOADS = ("W1", "W2", "W3")
CHILD_LIFETIME = 900.0  # a child process left behind by a crashed parent still ends
METRICS: dict[str, tuple[str, ...]] = {
    "W1": ("rt_per_s", "p50_ms", "p99_ms"),
    "W2": ("tasks_per_s",),
    "W3": ("deliveries_per_s",),
}


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the command on uvloop when it is installed (as the harness does), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


# --- progress ------------------------------------------------------------------------------


class Progress:
    """A one-line bar on stderr, redrawn at most ten times a second; drawn only on a terminal."""

    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self._drawn = 0.0

    def show(self, label: str, fraction: float, note: str = "") -> None:
        if not self.enabled or now() - self._drawn < 0.1:
            return
        self._drawn = now()
        fraction = max(0.0, min(1.0, fraction))
        filled = round(self.WIDTH * fraction)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r{label:<14} [{bar}] {fraction:4.0%}  {note}".ljust(78)[:78])
        self.stream.flush()

    def line(self, text: str) -> None:
        """Replace the bar with a line of text that stays (on a terminal or not)."""
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = 0.0


# --- the child processes -----------------------------------------------------------------------


class ChildTimeout(BenchError):
    """A child process did not say the expected word in time."""


class Child:
    """A worker or subscriber process (``turtlemq bench --role ...``), read line by line."""

    def __init__(self, process: asyncio.subprocess.Process, role: str) -> None:
        self.process, self.role = process, role

    @classmethod
    async def start(cls, role: str, argv: Sequence[str]) -> Child:
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turtlemq_client", "bench", "--role", role, *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=2**20,
        )  # fmt: skip
        return cls(process, role)

    async def expect(self, word: str, timeout: float, on_progress: Callable[[int], None] | None = None) -> str:
        """The rest of the next line starting with ``word``; ``PROGRESS`` lines go to ``on_progress``."""
        assert self.process.stdout is not None
        deadline = now() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.process.stdout.readline(), max(0.0, deadline - now()))
            except TimeoutError:
                raise ChildTimeout(f"the {self.role} process said no {word} within {timeout:g} s") from None
            if not line:
                raise BenchError(f"the {self.role} process ended (status {await self.process.wait()}) before {word}")
            head, _, rest = line.decode().strip().partition(" ")
            if head == word:
                return rest
            if head == "FAILED":
                raise BenchError(rest)
            if head == "PROGRESS" and on_progress is not None:
                on_progress(int(rest))

    async def stop(self, timeout: float = 15.0) -> str:
        """Ask the process to stop; what it printed after that (its ``STATS``)."""
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(b"STOP\n")
            await self.process.stdin.drain()
            self.process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            out, _ = await asyncio.wait_for(self.process.communicate(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            return ""
        return out.decode()


# --- the workloads -------------------------------------------------------------------------------


async def keep_showing(progress: Progress, label: str, fraction: Callable[[], float], note: Callable[[], str]) -> None:
    """Redraw the progress bar until cancelled."""
    while True:
        progress.show(label, fraction(), note())
        await asyncio.sleep(0.1)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The harness's percentile (nearest rank), so that p50/p99 mean the same thing in both."""
    k = min(len(sorted_values) - 1, max(0, round(q / 100.0 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


async def start_workers(args: argparse.Namespace) -> Child:
    child = await Child.start("worker", ["--url", args.worker_url, "--workers", str(args.workers)])
    await child.expect("READY", 60)
    return child


async def run_w1(args: argparse.Namespace, progress: Progress, label: str) -> dict[str, Any]:
    """Closed-loop round trips: ``--clients`` loops of submit-and-await, measured after a warm-up."""
    workers = await start_workers(args)
    clients: list[RpcClient] = []
    try:
        for _ in range(args.clients):
            clients.append(await RpcClient.open(args.url))
        counter = itertools.count()

        async def loop(client: RpcClient, deadline: float, latencies: list[float], errors: list[str]) -> None:
            while now() < deadline:
                data = task_payload(next(counter))
                started = now()
                try:
                    result = await client.call(data)
                except BenchError as exc:
                    errors.append(str(exc))
                    return
                latencies.append(now() - started)
                if result != data.upper():
                    errors.append(f"wrong result {result!r} for {data!r}")

        async def phase(seconds: float, name: str) -> tuple[list[float], list[str], float]:
            latencies: list[float] = []
            errors: list[str] = []
            started = now()
            ticker = asyncio.create_task(
                keep_showing(
                    progress,
                    name,
                    lambda: (now() - started) / seconds,
                    lambda: f"{len(latencies) / max(now() - started, 1e-9):,.0f} round trips/s",
                )
            )
            try:
                loops = (loop(client, started + seconds, latencies, errors) for client in clients)
                await asyncio.wait_for(asyncio.gather(*loops), seconds + args.timeout)
            finally:
                ticker.cancel()
            return latencies, errors, now() - started

        await phase(args.warmup, f"{label} warm-up")
        latencies, errors, wall = await phase(args.duration, label)
    except TimeoutError:
        raise BenchError(f"W1: the round trips did not finish within {args.timeout:g} s after the duration") from None
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        await workers.stop()
    if not latencies:
        raise BenchError(f"W1: no round trip completed ({'; '.join(errors[:3]) or 'no error reported'})")
    latencies.sort()
    unexpected = sum(client.unexpected for client in clients)
    return {
        "rt_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 3),
        "n": len(latencies),
        "wall_s": round(wall, 3),
        "errors": len(errors),
        "unexpected_results": unexpected,
        "first_error": errors[0] if errors else None,
        "ok": not errors and unexpected == 0,
    }


async def run_w2(args: argparse.Namespace, progress: Progress, label: str) -> dict[str, Any]:
    """A burst: ``--tasks`` submitted at once on one connection; tasks/s from first send to last result."""
    workers = await start_workers(args)
    client: RpcClient | None = None
    try:
        client = await RpcClient.open(args.url)
        warm_up = [task_payload(10**9 + i) for i in range(min(200, args.tasks))]
        await asyncio.wait_for(asyncio.gather(*(client.call(data) for data in warm_up)), args.timeout)
        payloads = [task_payload(i) for i in range(args.tasks)]
        started = now()
        calls = [asyncio.ensure_future(client.call(data)) for data in payloads]
        pending: set[asyncio.Future[str]] = set(calls)
        deadline = started + args.timeout
        while pending and now() < deadline:
            _, pending = await asyncio.wait(pending, timeout=min(0.1, deadline - now()))
            done_count = len(calls) - len(pending)
            progress.show(label, done_count / len(calls), f"{done_count / (now() - started):,.0f} tasks/s")
        wall = now() - started
        for call in pending:
            call.cancel()
    except TimeoutError:
        raise BenchError(f"W2: the warm-up tasks were not answered within {args.timeout:g} s") from None
    finally:
        if client is not None:
            await client.close()
        await workers.stop()
    answered = [call for call in calls if call.done() and not call.cancelled()]
    correct = sum(1 for data, call in zip(payloads, calls, strict=True) if _result(call) == data.upper())
    failed = [str(call.exception()) for call in answered if call.exception() is not None]
    if pending:
        failed.append(f"timed out after {args.timeout:g} s with {len(answered):,} of {args.tasks:,} answered")
    elif correct < args.tasks:
        failed.append(f"{args.tasks - correct:,} of {args.tasks:,} results missing or wrong")
    return {
        "tasks_per_s": round(len(answered) / wall, 1),
        "wall_s": round(wall, 3),
        "tasks": args.tasks,
        "answered": len(answered),
        "correct": correct,
        "unexpected_results": client.unexpected,
        "timed_out": bool(pending),
        "first_error": failed[0] if failed else None,
        "ok": correct == args.tasks and client.unexpected == 0,
    }


def _result(call: asyncio.Future[str]) -> str | None:
    if not call.done() or call.cancelled() or call.exception() is not None:
        return None
    return call.result()


async def run_w3(args: argparse.Namespace, progress: Progress, label: str) -> dict[str, Any]:
    """Fan-out: ``--messages`` to A, followed by ``--subs`` subscribers while as many follow B."""
    publisher = await Publisher.open(args.url)
    try:
        missing = await publisher.missing_topics([TOPIC_A, TOPIC_B])
        if missing:
            raise BenchError(
                f"W3 needs the topics {TOPIC_A} and {TOPIC_B} on the broker, and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing: an operator creates them, for example with "
                + " and ".join(f"`python manage.py create_topic {name}`" for name in missing)
            )
        subscribers = await Child.start(
            "subscriber",
            [
                *itertools.chain.from_iterable(("--sub-url", url) for url in args.sub_url),
                "--subs", str(args.subs), "--messages", str(args.messages), "--timeout", str(args.timeout),
            ],
        )  # fmt: skip
        try:
            return await _fan_out(args, progress, label, publisher, subscribers)
        finally:
            await subscribers.stop()
    finally:
        await publisher.close()


async def _fan_out(
    args: argparse.Namespace, progress: Progress, label: str, publisher: Publisher, subscribers: Child
) -> dict[str, Any]:
    await subscribers.expect("SUBSCRIBED", 300)
    # Every SUBSCRIBE is confirmed, so one probe on each topic should reach everyone; keep
    # probing (as the harness does) in case a broker confirms before the subscription is live.
    deadline = now() + 60
    while True:
        await publisher.publish(TOPIC_A, [PROBE])
        await publisher.publish(TOPIC_B, [PROBE])
        try:
            await subscribers.expect("READY", 0.5)
            break
        except ChildTimeout:
            if now() > deadline:
                raise BenchError("W3: the subscribers never received the probe messages") from None
    await publisher.wait_confirmed(args.timeout)
    expected = args.subs * args.messages

    def on_progress(delivered: int) -> None:
        progress.show(label, delivered / expected, f"{delivered / max(now() - started, 1e-9):,.0f} deliveries/s")

    messages = [topic_payload(seq) for seq in range(args.messages)]
    started = now()
    await publisher.publish(TOPIC_A, messages)
    published = now()
    tally = json.loads(await subscribers.expect("RESULT", args.timeout + 30, on_progress))
    await publisher.wait_confirmed(args.timeout)
    # Timed out: the rate of what did arrive, flagged, rather than no figure at all.
    timed_out = tally["t_last"] is None
    span = (tally["t_end"] if timed_out else tally["t_last"]) - started
    problems = fan_out_problems(args, tally, publisher)
    return {
        "deliveries_per_s": round((tally["a_total"] if timed_out else expected) / span, 1),
        "span_s": round(span, 4),
        "publish_s": round(published - started, 4),
        "timed_out": timed_out,
        "subs": args.subs,
        "messages": args.messages,
        **{key: value for key, value in tally.items() if key not in ("t_last", "t_end")},
        "published_ids_in_order": publisher.ids_in_order,
        "first_error": problems[0] if problems else None,
        "ok": not problems,
    }


def fan_out_problems(args: argparse.Namespace, tally: dict[str, Any], publisher: Publisher) -> list[str]:
    """What went wrong in W3, in words; empty when every check passed."""
    incomplete = args.subs - tally["a_complete_subs"]
    checks = [
        (incomplete > 0, f"{incomplete} subscribers of A missed messages"),
        (tally["a_max"] > args.messages, "a subscriber of A received more messages than were published"),
        (tally["out_of_order"] > 0, f"{tally['out_of_order']} messages out of order or duplicated on A"),
        (tally["b_received"] > 0, f"subscribers of B received {tally['b_received']} messages published to A"),
        (tally["foreign"] > 0, f"{tally['foreign']} messages named a topic their subscriber does not follow"),
        (tally["errors"] > 0, f"{tally['errors']} ERROR frames or lost connections among the subscribers"),
        (not publisher.ids_in_order, "PUBLISHED ids did not increase within a topic"),
    ]
    return [text for failed, text in checks if failed] + publisher.errors


RUNNERS = {"W1": run_w1, "W2": run_w2, "W3": run_w3}


# --- reporting ----------------------------------------------------------------------------------


def summarize(workload: str, reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the repetitions, and whether every one verified."""
    summary: dict[str, Any] = {}
    for key in METRICS[workload]:
        values = [rep[key] for rep in reps if rep.get(key) is not None]
        summary[key] = round(statistics.median(values), 3) if values else None
    summary["ok"] = bool(reps) and all(rep.get("ok") for rep in reps)
    problems = [rep.get("error") or rep.get("first_error") for rep in reps if not rep.get("ok")]
    if problems:
        summary["error"] = problems[0] or "see --json"
    return summary


def one_line(workload: str, result: dict[str, Any]) -> str:
    """A repetition's figures in a few words."""
    if result.get("error"):
        return f"failed: {result['error']}"
    verdict = "verified" if result.get("ok") else f"NOT VERIFIED ({result.get('first_error') or 'see --json'})"
    if workload == "W1":
        latency = f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
        figure = f"{result['rt_per_s']:,.0f} round trips/s, {latency}"
    elif workload == "W2":
        figure = f"{result['tasks_per_s']:,.0f} tasks/s"
        if result["timed_out"]:
            figure += f" (timed out: {result['answered']:,}/{result['tasks']:,} answered)"
    else:
        figure = f"{result['deliveries_per_s']:,.0f} deliveries/s"
        if result["timed_out"]:
            figure += f" (timed out: {result['a_total']:,}/{result['subs'] * result['messages']:,} delivered)"
    return f"{figure}; {verdict}"


def format_table(report: dict[str, Any]) -> str:
    """The summary table printed at the end."""
    rows = [("workload", "figure", "median", "p50 ms", "p99 ms", "check")]
    names = {"W1": "round trips/s", "W2": "tasks/s", "W3": "deliveries/s"}
    for workload, entry in report["workloads"].items():
        summary = entry["summary"]
        value = summary.get(METRICS[workload][0])
        p50 = f"{summary['p50_ms']:.2f}" if summary.get("p50_ms") is not None else ""
        p99 = f"{summary['p99_ms']:.2f}" if summary.get("p99_ms") is not None else ""
        check = "ok" if summary["ok"] else f"FAILED: {summary.get('error')}"
        rows.append((workload, names[workload], f"{value:,.0f}" if value is not None else "-", p50, p99, check))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        f"TurtleMQ bench: {report['url']} ({report['reps']} rep{'s' if report['reps'] != 1 else ''}, "
        f"median; load generator on {report['loop']})"
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        lines.append("  ".join([*cells, row[5]]))
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------------


async def cmd_bench(args: argparse.Namespace) -> int:
    """Run the chosen workloads; print the table (or JSON); status 1 unless every result verified."""
    args.url = url_with_token(args.url, args.token)
    args.worker_url = url_with_token(args.worker_url or args.url, args.token)
    args.sub_url = [url_with_token(url, args.token) for url in args.sub_url or [args.url]]
    if args.role == "worker":
        await worker_role(args.url, args.workers, CHILD_LIFETIME)
        return 0
    if args.role == "subscriber":
        await subscriber_role(args.sub_url, args.subs, args.messages, args.timeout, CHILD_LIFETIME)
        return 0

    progress = Progress()
    workloads = args.workload
    report: dict[str, Any] = {"url": args.url, "reps": args.reps, "loop": loop_name(), "workloads": {}}
    for workload in workloads:
        reps = []
        for rep in range(1, args.reps + 1):
            label = workload if args.reps == 1 else f"{workload} {rep}/{args.reps}"
            try:
                result = await RUNNERS[workload](args, progress, label)
            except BenchError as exc:
                result = {"ok": False, "error": str(exc)}
            progress.line(f"{label}: {one_line(workload, result)}")
            reps.append(result)
        report["workloads"][workload] = {"summary": summarize(workload, reps), "reps": reps}
    report["ok"] = all(entry["summary"]["ok"] for entry in report["workloads"].values())
    print(json.dumps(report) if args.json else format_table(report), flush=True)
    return 0 if report["ok"] else 1


def workload_list(text: str) -> list[str]:
    """``--workload``: ``all``, one workload, or several separated by commas, run in the order W1, W2, W3."""
    names = {name.strip().upper() for name in text.split(",") if name.strip()}
    if "ALL" in names:
        return list(WORKLOADS)
    unknown = names - set(WORKLOADS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected W1, W2, W3 or all, not {text!r}")
    return [name for name in WORKLOADS if name in names]


def add_parser(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``bench`` among the ``turtlemq`` subcommands."""
    bench = commands.add_parser(
        "bench",
        parents=list(parents),
        help="measure the broker: round trips, a burst of tasks, fan-out",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--workload",
        type=workload_list,
        default=list(WORKLOADS),
        metavar="W1|W2|W3|all",
        help="what to run, several separated by commas (default all)",
    )
    bench.add_argument("--reps", type=int, default=1, help="repetitions of each workload; the table shows medians")
    bench.add_argument("--duration", type=float, default=10.0, help="W1: seconds measured (default 10)")
    bench.add_argument("--warmup", type=float, default=1.0, help="W1: seconds before measuring (default 1)")
    bench.add_argument("--clients", type=int, default=16, help="W1: client connections (default 16)")
    bench.add_argument("--workers", type=int, default=4, help="W1/W2: worker connections (default 4)")
    bench.add_argument("--tasks", type=int, default=5000, help="W2: tasks in the burst (default 5000)")
    bench.add_argument("--subs", type=int, default=100, help="W3: subscribers of A, and as many of B (default 100)")
    bench.add_argument("--messages", type=int, default=1000, help="W3: messages published to A (default 1000)")
    bench.add_argument("--worker-url", help="where the workers connect (default: --url)")
    bench.add_argument(
        "--sub-url", action="append", help="where subscribers connect, spread round-robin; repeatable (default: --url)"
    )
    bench.add_argument(
        "--timeout", type=float, default=120.0, help="give up on a workload's answers after this long (default 120 s)"
    )
    bench.add_argument("--json", action="store_true", help="print the results as one JSON object")
    bench.add_argument("--role", choices=["worker", "subscriber"], help=argparse.SUPPRESS)
    bench.set_defaults(run=cmd_bench, run_loop=run_event_loop)
    return bench
