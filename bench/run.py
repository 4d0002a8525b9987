"""``make bench``: TurtleMQ on its stacks beside the references, measured in one run, within ten minutes.

    python -m bench.run [--duration 5] [--reps 3] [--timeout 30] [--idle 5000] [--note TEXT] [--no-results]

1. Every system is started, each on a free loopback port: TurtleMQ on its
   stacks (the embedded default on daphne and on uvicorn, PostgreSQL + Redis
   with two processes: clients and the publisher on the first, workers on the
   second, subscribers on both) and the references' servers (the bare
   ``websockets`` relay, the lean in-process Channels relay on each server;
   RabbitMQ and Celery + Redis use the services already running). A missing
   service or library skips its row.
2. W1 and W2 run in ``--reps`` rounds: each round measures every system once,
   TurtleMQ with ``turtlemq bench`` (every result verified), the references
   with the shared harness, on the same workloads. The tables show each
   system's median. On this kind of machine the speed of a core drifts by a
   fifth, at times by half, within minutes (other machines share the host):
   measured one system after the other, a ratio compared two machine speeds
   as much as two brokers, and swung across its goal from run to run. Rounds
   put every system's repetitions side by side in time, and each round goes
   through them in the reverse order of the one before. W3, far from its
   goals and the slowest to repeat, runs once per system after the rounds.
3. 5,000 idle subscriber connections held on the embedded process of the
   production server, for its resident memory per connection.
4. The tables (figures, ratios, the issue's targets, memory), printed and
   appended as a dated section to ``bench/RESULTS.md``.

A step that would not fit in what is left of the time budget is skipped and
says so in the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import references, report
from bench.report import Memory, Row
from bench.stacks import (
    REPO,
    SERVERS,
    Stack,
    Unavailable,
    channels_relay_server,
    embedded_stack,
    postgres_redis_stack,
    raise_open_files_limit,
    ws_relay_server,
)

RESULTS = REPO / "bench" / "RESULTS.md"
REPEATED = ("W1", "W2")  # the workloads run --reps times (see above)


class Budget:
    """The run's time limit: a step starts only if its estimate fits in what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def allows(self, estimate: float) -> bool:
        return time.monotonic() + estimate <= self.deadline


STARTED = time.monotonic()
IDLE_TOPIC = "Django"  # a starter topic, there from the migrations


def log(text: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:5.0f} s] {text}", file=sys.stderr, flush=True)


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def read_line(process: subprocess.Popen, word: str, timeout: float) -> str:
    """The rest of the child's next stdout line starting with ``word``, waiting at most ``timeout``."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            raise TimeoutError(f"no {word} within {timeout:g} s")
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"ended (status {process.wait()}) before {word}")
        if line.startswith(word):
            return line[len(word) :].strip()


# --- TurtleMQ ----------------------------------------------------------------------------------


def create_topics(stack: Stack) -> str:
    """Create topics A and B for W3; a note when that was not possible."""
    for name in ("A", "B"):
        done = stack.manage("create_topic", name)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"W3 not run: `manage.py create_topic {name}` failed ({reason})"
    return ""


def bench_tool(stack: Stack, options: argparse.Namespace, workload: str) -> dict[str, Any]:
    """One repetition of ``workload`` with ``turtlemq bench --json`` against ``stack``: its figures."""
    sub_urls = [arg for server in stack.servers for arg in ("--sub-url", server.url)]
    argv = [
        sys.executable, "-m", "turtlemq_client", "bench", "--json", "--workload", workload,
        "--url", stack.client_url, "--worker-url", stack.worker_url, *sub_urls,
        "--duration", str(options.duration), "--timeout", str(options.timeout),
    ]  # fmt: skip
    # stderr (the progress bar) goes to the terminal; stdout is the JSON report.
    try:
        done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=3 * options.timeout + 120)
        entry = json.loads(done.stdout)["workloads"][workload]
    except (subprocess.SubprocessError, json.JSONDecodeError, KeyError) as exc:
        return {"ok": False, "error": f"turtlemq bench failed: {exc}"}
    return entry["reps"][0] | entry["summary"]


class Contender:
    """A system measured in rounds (see the module's docstring): started once, then one repetition at a time."""

    def __init__(self, row: Row, workloads: tuple[str, ...]) -> None:
        self.row = row
        self.workloads = workloads
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []

    def start(self) -> None:
        """Start what must run (raise RuntimeError or OSError when it does not)."""

    def stop(self) -> None:
        """Stop what ``start`` started."""

    def once(self, workload: str, options: argparse.Namespace) -> dict[str, Any]:
        """One repetition of ``workload``: its figures, or ``{"ok": False, "error": why}``."""
        raise NotImplementedError

    def measure(self, workload: str, options: argparse.Namespace) -> None:
        self.results.setdefault(workload, []).append(self.once(workload, options))

    def finish(self) -> Row:
        """The row: each workload's median over its repetitions, the notes."""
        for workload, reps in self.results.items():
            self.row.figures[workload] = median_figures(reps)
            errors = [rep["error"] for rep in reps if rep.get("error")]
            if errors:
                self.notes.append(f"{workload}: {errors[0]}")
        self.row.note = "; ".join(note for note in [self.row.note, *self.notes] if note)
        return self.row


def median_figures(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several repetitions: the median of each figure; verified only if every one was."""
    summary: dict[str, Any] = {}
    for key in {key for rep in reps for key, value in rep.items() if _is_figure(value)}:
        summary[key] = statistics.median(rep[key] for rep in reps if _is_figure(rep.get(key)))
    summary["ok"] = bool(reps) and all(rep.get("ok", rep.get("all_ok", True)) for rep in reps)
    summary["timed_out"] = any(rep.get("timed_out") for rep in reps)
    errors = [rep["error"] for rep in reps if rep.get("error")]
    if errors:
        summary["error"] = errors[0]
    return summary


def _is_figure(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class TurtleMQ(Contender):
    """A TurtleMQ stack, measured with ``turtlemq bench``."""

    def __init__(self, stack: Stack, key: str) -> None:
        super().__init__(Row(key, stack.label, turtlemq=True, server=stack.server), ("W1", "W2", "W3"))
        self.stack = stack

    def start(self) -> None:
        log(f"starting TurtleMQ, {self.stack.label}")
        self.stack.start()
        topics_missing = create_topics(self.stack)
        if topics_missing:
            self.notes.append(topics_missing)
            self.workloads = REPEATED

    def stop(self) -> None:
        self.stack.stop()

    def once(self, workload: str, options: argparse.Namespace) -> dict[str, Any]:
        log(f"{workload}, TurtleMQ, {self.stack.label}")
        return bench_tool(self.stack, options, workload)


def measure_idle(stack: Stack, count: int) -> Memory:
    """Resident memory of the broker process before and after ``count`` more idle subscribers."""
    log(f"{count:,} idle subscribers on {stack.label}")
    holder = subprocess.Popen(
        [sys.executable, "-m", "bench.idle", stack.client_url, str(count), "--topic", IDLE_TOPIC],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None
    try:
        read_line(holder, "WARM", 120)
        before = rss(stack.servers[0].pid)
        holder.stdin.write("GO\n")
        holder.stdin.flush()
        read_line(holder, "HELD", 240)
        after = rss(stack.servers[0].pid)
        holder.stdin.write("STOP\n")
        holder.stdin.flush()
    finally:
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    return Memory(f"embedded, {stack.server}", count, before, after)


# --- references --------------------------------------------------------------------------------


def reference_list(workdir: Path, servers: list[str]) -> list[tuple[references.Reference | None, Row]]:
    """Every reference with its row; a reference that cannot run comes as ``None`` with a note."""
    all_workloads = ("W1", "W2", "W3")
    entries: list[tuple[references.Reference | None, Row]] = []

    def add(key: str, label: str, make: Any) -> None:
        try:
            references.harness_available()
            entries.append((make(), Row(key, label)))
        except Unavailable as exc:
            entries.append((None, Row(key, label, note=f"skipped: {exc}")))

    add(
        "ws-relay",
        "bare websockets relay (ws_relay.py), no Django",
        lambda: references.Reference("ws_relay", "ws", all_workloads, server=ws_relay_server(workdir)),
    )
    for server in servers:
        add(
            f"channels-relay-{server}",
            f"Channels relay, lean + direct, {server}",
            lambda server=server: references.Reference(
                f"channels_relay_{server}", "ws", all_workloads, server=channels_relay_server(workdir, server)
            ),
        )

    def rabbitmq() -> references.Reference:
        references.check_rabbitmq()
        return references.Reference("rabbitmq", "rabbitmq", all_workloads, url=references.RABBITMQ_URL)

    def celery() -> references.Reference:
        references.check_celery()
        return references.Reference("celery", "celery", ("W1", "W2"), url=references.CELERY_URL)

    add("rabbitmq", "RabbitMQ + aio-pika, transient messages", rabbitmq)
    add("celery", "Celery + Redis", celery)
    return entries


class Reference(Contender):
    """A reference, measured with the shared harness."""

    def __init__(self, reference: references.Reference, row: Row) -> None:
        super().__init__(row, reference.workloads)
        self.reference = reference

    def start(self) -> None:
        server = self.reference.server
        if server is not None:
            log(f"starting {self.row.label}")
            try:
                server.launch()
                server.wait_ready()
            except (RuntimeError, OSError):
                server.stop()
                raise
            self.reference.url = server.url

    def stop(self) -> None:
        if self.reference.server is not None:
            self.reference.server.stop()

    def once(self, workload: str, options: argparse.Namespace) -> dict[str, Any]:
        log(f"{workload}, {self.row.label}")
        return references.run_harness(
            self.reference, workload, vars(options) | {"reps": 1}, options.workdir / "harness.jsonl"
        )


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "commit": commit.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else ""),
    }


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def section(options: argparse.Namespace, started: datetime.datetime, load_before: str, body: str) -> str:
    info = machine()
    command = shlex.join(["python", "-m", "bench.run", *options.argv])
    note = options.note or ""
    repetitions = "one repetition each"
    if options.reps != 1:
        repetitions = f"W1 and W2 the median of {options.reps} rounds through every system, W3 one"
    return f"""
## {started:%Y-%m-%d %H:%M} UTC: `make bench`

- command: `make bench` (`{command}`); W1 {options.duration:g} s after a 1 s warm-up, W2 5,000 tasks, W3 1,000
  messages to 100 of 200 subscribers; {repetitions}; TurtleMQ with DEBUG off and access control off
- commit: {info["commit"]}
- machine: {info["nproc"]} cores (nproc), {info["cpu"]}, Python {info["python"]}, {info["system"]}
- load average (1 / 5 / 15 min): {load_before} before the run, {load_average()} after it{note and f"; {note}"}

{body}
"""


def run_rounds(contenders: list[Contender], options: argparse.Namespace, budget: Budget) -> None:
    """Every contender's workloads: ``REPEATED`` ones in ``--reps`` rounds, each round once through all, then W3.

    A round goes through the contenders in one order, the next in the
    reverse one, so that a drift of the machine's speed meets them alike.
    """
    estimate = options.duration + 8
    for round_number in range(options.reps):
        order = contenders if round_number % 2 == 0 else contenders[::-1]
        for contender in order:
            for workload in REPEATED:
                if workload not in contender.workloads:
                    continue
                if not budget.allows(estimate + options.timeout):
                    contender.notes.append(f"{workload}: some repetitions skipped (time budget)")
                    continue
                contender.measure(workload, options)
    for contender in contenders:
        for workload in contender.workloads:
            if workload in REPEATED:
                continue
            if not budget.allows(options.timeout + 15):
                contender.notes.append(f"{workload} skipped: time budget")
                continue
            contender.measure(workload, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="W1 seconds measured (default 5)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of W1 and W2, medians shown (default 3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="W2/W3 give up after this long (default 30)")
    parser.add_argument("--idle", type=int, default=5000, help="idle subscriber connections (0: skip)")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds the whole run may take (default 570)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="ASGI servers to measure (default all)")
    parser.add_argument("--no-references", action="store_true", help="measure TurtleMQ only")
    parser.add_argument("--note", help="a remark for RESULTS.md, e.g. about other load on the machine")
    parser.add_argument("--no-results", action="store_true", help=f"do not append to {RESULTS.relative_to(REPO)}")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their folder is printed)")
    options = parser.parse_args()
    options.argv = sys.argv[1:]
    servers = [name for name in options.servers.split(",") if name]
    raise_open_files_limit()
    budget = Budget(options.budget)
    started = datetime.datetime.now(datetime.UTC)
    load_before = load_average()
    options.workdir = Path(tempfile.mkdtemp(prefix="turtlemq-bench-"))
    log(f"logs in {options.workdir}")
    entries: list[Row | Contender] = []  # in the tables' order: rows of what is skipped, and contenders
    memory: list[Memory] = []
    production = options.production = report.PRODUCTION_SERVER if report.PRODUCTION_SERVER in servers else servers[-1]
    running: list[Contender] = []  # those that started
    try:
        plans = [
            (f"turtlemq-embedded-{server}", lambda server=server: embedded_stack(options.workdir, server))
            for server in servers
        ]
        plans.append(
            (f"turtlemq-postgres-redis-{production}", lambda: postgres_redis_stack(options.workdir, production))
        )
        for key, make in plans:
            try:
                entries.append(TurtleMQ(make(), key))
            except Unavailable as exc:
                entries.append(Row(key, key.removeprefix("turtlemq-"), turtlemq=True, note=f"skipped: {exc}"))
        if not options.no_references:
            for reference, row in reference_list(options.workdir, servers):
                entries.append(row if reference is None else Reference(reference, row))
        contenders = [entry for entry in entries if isinstance(entry, Contender)]
        for contender in contenders:
            try:
                contender.start()
                running.append(contender)
            except (RuntimeError, OSError) as exc:
                contender.notes.append(f"did not start: {exc}")
        run_rounds(running, options, budget)
        idle = [c for c in running if isinstance(c, TurtleMQ) and c.row.key == f"turtlemq-embedded-{production}"]
        if options.idle and idle:
            try:
                memory.append(measure_idle(idle[0].stack, options.idle))
            except (RuntimeError, TimeoutError) as exc:
                idle[0].notes.append(f"idle connections: {exc}")
    finally:
        for entry in entries:  # also those that never started: a stack's database is made with it
            if isinstance(entry, Contender):
                entry.stop()
        if not options.keep_logs:
            shutil.rmtree(options.workdir, ignore_errors=True)
    rows = [entry.finish() if isinstance(entry, Contender) else entry for entry in entries]
    body = "\n\n".join(
        [
            report.figures_table(rows),
            "Ratios (TurtleMQ's figure / the reference's; higher is better for TurtleMQ):",
            report.ratios_table(rows),
            f"The issue's targets (on {report.PRODUCTION_SERVER}, the production server):",
            report.targets(rows, memory),
            "Resident memory of idle subscriber connections (RSS delta / connections):",
            report.memory_table(memory),
        ]
    )
    text = section(options, started, load_before, body)
    print(text)
    if not options.no_results:
        with RESULTS.open("a") as results:
            results.write(text)
        log(f"appended to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
