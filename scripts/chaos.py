"""Chaos run: every task gets exactly one correct result while workers and a broker process die.

``python scripts/chaos.py`` (``make chaos``) starts two broker processes
(daphne) on a fresh PostgreSQL database and a Redis prefix of their own, all
on 127.0.0.1. Clients with stable ``clientId``s (``turtlemq_client.Client``)
submit tasks through both processes while worker processes
(``turtlemq_client.Worker``, started by this script as ``chaos.py worker``)
answer them through both. Meanwhile, at random points of the run:

* workers are SIGKILLed mid-task and started again;
* one worker hangs on a task past its lease (``TURTLEMQ_DEFAULT_LEASE``), then
  answers it late: the broker has given the task to another worker and
  refuses the late answer;
* the second broker process is SIGKILLed and started again on its port: its
  clients and workers reconnect; the clients re-send what is pending;
* every database connection of both broker processes is cut at once (the
  server ends them, as a restarted or failed-over PostgreSQL would): batches
  in flight lose their answers, committed or not.

At the end every client must hold exactly one correct result per messageId,
and the database must show every task DONE once with the right result:
nothing lost, nothing stuck. The run prints those counts and exits 0 only
then (1 when a check fails, 77 when PostgreSQL or Redis is not reachable).
Everything is bounded: ``--deadline`` seconds at most.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from turtlemq_client import Backoff, Client, Worker  # noqa: E402

EXIT_SERVICES_MISSING = 77

# Housekeeping of the broker processes in the run: quick enough that a dead
# process or an expired lease is dealt with within seconds.
CHAOS_ENV = {
    "TURTLEMQ_TICK": "0.2",
    "TURTLEMQ_PROCESS_DEAD_AFTER": "5",
    "TURTLEMQ_RETRY_BACKOFF": "0.2",
    "TURTLEMQ_DEFAULT_LEASE": "3",
    "TURTLEMQ_LOG_LEVEL": "WARNING",
}
HANG_FOR = 3 * float(CHAOS_ENV["TURTLEMQ_DEFAULT_LEASE"])  # the hanging worker answers well after its lease
RECONNECT = Backoff(initial=0.1, maximum=1.0)


def expected_result(data: str) -> str:
    """What a worker answers for ``data``; the checks recompute it."""
    return hashlib.blake2b(data.encode(), digest_size=8).hexdigest()


# --- the worker process -------------------------------------------------------------------------------


async def work(url: str, hang_on: int | None, work_ms: float) -> None:
    """Answer tasks until killed; hang on the ``hang_on``-th task (1-based) past its lease."""
    handled = 0

    async def handle(data: str) -> str:
        nonlocal handled
        handled += 1
        if handled == hang_on:
            print("HANG", data, flush=True)
            await asyncio.sleep(HANG_FOR)
            print("LATE", data, flush=True)  # this answer comes after the lease: the broker refuses it
        elif work_ms:
            await asyncio.sleep(random.uniform(0, work_ms) / 1000)
        return expected_result(data)

    worker = Worker(url, handle, backoff=RECONNECT)
    await worker.start()
    print("READY", flush=True)
    await worker.run()


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class WorkerHandle:
    """One worker slot: the process currently filling it and what it printed."""

    number: int
    url: str
    hang_on: int | None
    work_ms: float
    log_dir: Path
    say: Callable[[str], None]
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    lines: list[str] = field(default_factory=list)
    starts: int = 0

    async def start(self) -> None:
        args = [sys.executable, __file__, "worker", self.url, "--work-ms", str(self.work_ms)]
        if self.hang_on is not None and self.starts == 0:
            args += ["--hang-on", str(self.hang_on)]
        self.starts += 1
        log = open(self.log_dir / f"worker-{self.number}.log", "ab")  # noqa: SIM115
        self.process = await asyncio.create_subprocess_exec(
            *args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=log
        )
        log.close()
        self.reader = asyncio.create_task(self._read(self.process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := (await process.stdout.readline()).decode().rstrip("\n"):
            self.lines.append(line)
            if line.startswith("HANG"):
                self.say(f"worker {self.number} hangs on '{line[5:]}' past its lease")
            elif line.startswith("LATE"):
                self.say(f"worker {self.number} answers '{line[5:]}' late (the broker refuses it)")

    async def stop(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            await asyncio.wait_for(self.process.wait(), 10)


class CountingClient(Client):
    """A Client that also counts the result frames it received per messageId (repeats included)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frames: Counter[str] = Counter()

    def _received(self, frame: dict) -> None:
        if frame.get("type") in ("RESPONSE_TASK", "TASK_FAILED") and isinstance(frame.get("messageId"), str):
            self.frames[frame["messageId"]] += 1
        super()._received(frame)


@dataclass
class ClientRun:
    client: CountingClient
    tasks: dict[str, str]  # messageId -> data
    results: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Chaos:
    """The run: brokers, workers, clients, the disturbances, and the final checks."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        from tests.e2e.servers import BrokerServer

        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.rng = random.Random(args.seed)
        self.brokers = [BrokerServer(env, log_path=log_dir / f"broker-{name}.log") for name in "AB"]
        self.started = time.monotonic()
        self.events: list[str] = []
        self.workers: list[WorkerHandle] = []
        self.clients: list[ClientRun] = []

    def say(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {message}"
        self.events.append(line)
        print(line, flush=True)

    @property
    def answered(self) -> int:
        return sum(len(run.results) + len(run.errors) for run in self.clients)

    async def run(self) -> bool:
        args = self.args
        for broker in self.brokers:
            broker.launch()
        for broker in self.brokers:
            await asyncio.to_thread(broker.wait_healthy)
        self.say(f"2 broker processes up: A on {self.brokers[0].url}, B on {self.brokers[1].url}")

        # Worker 0 (the one that hangs) is on A, which is never killed, so that its lease really expires.
        for number in range(args.workers):
            url = self.brokers[number % 2].url
            hang_on = args.hang_on if number == 0 and args.hang_on else None
            handle = WorkerHandle(number, url, hang_on, args.work_ms, self.log_dir, self.say)
            await handle.start()
            self.workers.append(handle)
        run_id = uuid.uuid4().hex[:6]
        shares = [args.tasks // args.clients + (n < args.tasks % args.clients) for n in range(args.clients)]
        for number, share in enumerate(shares):
            url = self.brokers[number % 2].url
            client = CountingClient(url, client_id=f"chaos-{run_id}-{number}", backoff=RECONNECT)
            tasks = {f"c{number}-{n}": f"client {number} task {n} {self.rng.getrandbits(32):08x}" for n in range(share)}
            self.clients.append(ClientRun(client, tasks))
        self.say(f"{args.workers} workers, {args.clients} clients, {args.tasks} tasks")

        submitting = asyncio.gather(*(self.submit_all(run) for run in self.clients))
        disturbing = asyncio.create_task(self.disturb())
        try:
            await asyncio.wait_for(asyncio.shield(submitting), args.deadline - (time.monotonic() - self.started))
        except TimeoutError:
            self.say(f"DEADLINE: only {self.answered} of {args.tasks} answered after {args.deadline:g} s")
        finally:
            disturbing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await disturbing
            submitting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await submitting
            for run in self.clients:
                await run.client.close()
            for handle in self.workers:
                await handle.stop(signal.SIGKILL)
            for broker in self.brokers:
                broker.send_signal(signal.SIGTERM)
            for broker in self.brokers:
                await asyncio.to_thread(broker.wait_stopped)
        self.say(f"run over: {self.answered} of {args.tasks} submissions answered")
        return await asyncio.to_thread(self.check)

    async def submit_all(self, run: ClientRun) -> None:
        await run.client.start()
        in_flight = asyncio.Semaphore(self.args.in_flight)

        async def submit(message_id: str, data: str) -> None:
            async with in_flight:
                try:
                    run.results[message_id] = await run.client.submit(data, message_id=message_id)
                except Exception as exc:
                    run.errors[message_id] = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(submit(message_id, data) for message_id, data in run.tasks.items()))

    async def disturb(self) -> None:
        """Kill and restart workers and broker B at random points of the progress."""
        total = self.args.tasks
        plan = [(self.rng.uniform(0.05, 0.85), "worker") for _ in range(self.args.worker_kills)]
        plan += [(self.rng.uniform(0.3, 0.6), "broker") for _ in range(self.args.broker_kills)]
        plan += [(self.rng.uniform(0.1, 0.9), "database") for _ in range(self.args.db_cuts)]
        plan.sort()
        for at, what in plan:
            while self.answered < at * total:
                await asyncio.sleep(0.02)
            if what == "broker":
                await self.kill_broker()
            elif what == "database":
                await asyncio.to_thread(self.cut_database_connections)
            else:
                await self.kill_worker()

    async def kill_worker(self) -> None:
        # Never the hanging worker: its task must be taken back by the lease, not by its death.
        handle = self.rng.choice([handle for handle in self.workers if handle.hang_on is None])
        await handle.stop(signal.SIGKILL)
        self.say(f"SIGKILL worker {handle.number} (on {'AB'[handle.number % 2]}) at {self.answered} answered")
        await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        await handle.start()
        self.say(f"worker {handle.number} started again")

    async def kill_broker(self) -> None:
        broker = self.brokers[1]
        await asyncio.to_thread(broker.kill)
        self.say(f"SIGKILL broker process B at {self.answered} answered")
        await asyncio.sleep(self.rng.uniform(0.5, 1.5))
        await asyncio.to_thread(broker.start)
        self.say("broker process B started again on its port")

    def cut_database_connections(self) -> None:
        import psycopg

        with psycopg.connect(self.env["DATABASE_URL"], autocommit=True) as db:
            cut = db.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        self.say(f"cut {cut} database connections of the brokers at {self.answered} answered")

    # --- the verdict ----------------------------------------------------------------------------------

    def check(self) -> bool:
        import psycopg

        problems: list[str] = []
        expected = {
            (run.client.client_id, message_id): expected_result(data)
            for run in self.clients
            for message_id, data in run.tasks.items()
        }

        # What the clients hold.
        wrong = missing = failed = repeats = 0
        for run in self.clients:
            for message_id, data in run.tasks.items():
                if message_id in run.errors:
                    failed += 1
                elif message_id not in run.results:
                    missing += 1
                elif run.results[message_id] != expected_result(data):
                    wrong += 1
            repeats += sum(count - 1 for count in run.client.frames.values() if count > 1)
        correct = len(expected) - wrong - missing - failed
        print(
            f"clients: {len(expected)} submitted, {correct} with exactly one correct result, "
            f"{wrong} wrong, {missing} missing, {failed} failed "
            f"({repeats} repeated result frames after reconnects, ignored by the client library)"
        )
        if correct != len(expected):
            problems.append("some client does not hold exactly one correct result per messageId")
            for run in self.clients:
                for message_id, error in list(run.errors.items())[:5]:
                    print(f"  {run.client.client_id} {message_id}: {error}")
                unanswered = [m for m in run.tasks if m not in run.results and m not in run.errors]
                for message_id in unanswered[:5]:
                    print(f"  {run.client.client_id} {message_id}: no result ({run.client.frames[message_id]} frames)")

        # What the database holds.
        with psycopg.connect(self.env["DATABASE_URL"]) as database:
            rows = database.execute(
                "SELECT client_id, message_id, data, state, result, attempts, last_error FROM broker_task"
            ).fetchall()
            live = database.execute("SELECT count(*) FROM broker_connection WHERE disconnected_at IS NULL").fetchone()
            running = database.execute("SELECT count(*) FROM broker_brokerprocess WHERE stopped_at IS NULL").fetchone()
        states = Counter(state for _, _, _, state, _, _, _ in rows)
        per_message = Counter((client_id, message_id) for client_id, message_id, *_ in rows)
        bad_results = sum(
            1
            for client_id, message_id, data, state, result, *_ in rows
            if state == "done" and result != expected.get((client_id, message_id), expected_result(data))
        )
        unknown = sum(1 for key in per_message if key not in expected)
        if problems:
            # The database's view of the tasks a client lacks.
            for run in self.clients:
                for message_id in [m for m in run.tasks if m not in run.results][:5]:
                    with psycopg.connect(self.env["DATABASE_URL"]) as database:
                        row = database.execute(
                            "SELECT id, state, attempts, failures, reply_channel, worker_id, assigned_at, finished_at,"
                            " delivered_at FROM broker_task WHERE client_id = %s AND message_id = %s",
                            (run.client.client_id, message_id),
                        ).fetchone()
                    print(f"  database row of {run.client.client_id} {message_id}: {row}")
        retried = sum(1 for *_, attempts, _ in rows if attempts > 1)
        lease_expired = sum(1 for *_, last_error in rows if last_error == "lease expired")
        by_state = ", ".join(f"{state} {states.get(state, 0)}" for state in ("done", "queued", "assigned", "failed"))
        print(
            f"database: {len(rows)} tasks for {len(expected)} submissions; {by_state}, cancelled {states['cancelled']}"
            f"; {sum(n - 1 for n in per_message.values())} duplicates, {unknown} unknown, {bad_results} wrong results"
            f"; {retried} ran more than once, {lease_expired} taken back at lease expiry"
            f"; after shutdown {live[0]} live connections, {running[0]} running broker processes"
        )
        if len(rows) != len(expected) or len(per_message) != len(expected) or unknown:
            problems.append("the database does not hold exactly one task per submission")
        if states.get("done", 0) != len(expected):
            problems.append("some task is not DONE (lost, stuck or failed)")
        if bad_results:
            problems.append("some stored result is wrong")
        if live[0] or running[0]:
            problems.append("a connection or broker process was left open by the shutdown")

        hanger = self.workers[0] if self.workers and self.workers[0].hang_on else None
        if hanger is not None:
            hung = [line.split(" ", 1)[1] for line in hanger.lines if line.startswith("HANG")]
            print(f"hang: worker 0 hung on {hung or 'nothing'}; tasks taken back at lease expiry: {lease_expired}")
            if not hung or not lease_expired:
                problems.append("the hanging worker's lease did not expire")

        elapsed = time.monotonic() - self.started
        if problems:
            print(f"chaos: FAIL after {elapsed:.1f} s: " + "; ".join(problems))
            print(f"logs: {self.log_dir}")
            return False
        print(f"chaos: PASS in {elapsed:.1f} s")
        return True


async def chaos(args: argparse.Namespace) -> int:
    from tests.e2e.servers import ServiceMissing, postgres_redis_env

    log_dir = Path(tempfile.mkdtemp(prefix="turtlemq-chaos-"))
    try:
        with postgres_redis_env(CHAOS_ENV) as env:
            passed = await Chaos(args, env, log_dir).run()
    except ServiceMissing as exc:
        print(f"chaos: SKIP: {exc} is not reachable")
        return EXIT_SERVICES_MISSING
    if passed and not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if passed else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks submitted in total (default 5000)")
    parser.add_argument("--clients", type=int, default=8, help="clients, each with its own clientId (default 8)")
    parser.add_argument("--workers", type=int, default=6, help="worker processes (default 6)")
    parser.add_argument("--worker-kills", type=int, default=8, help="workers SIGKILLed and restarted (default 8)")
    parser.add_argument("--broker-kills", type=int, default=1, help="times broker B is SIGKILLed (default 1)")
    parser.add_argument(
        "--db-cuts", type=int, default=3, help="times the brokers' database connections are cut (default 3)"
    )
    parser.add_argument("--hang-on", type=int, default=5, help="worker 0 hangs on its n-th task (default 5)")
    parser.add_argument("--in-flight", type=int, default=50, help="pending submissions per client (default 50)")
    parser.add_argument("--work-ms", type=float, default=2.0, help="a task takes up to this long (default 2)")
    parser.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random disturbances")
    parser.add_argument("--keep-logs", action="store_true", help="keep the broker and worker logs of a passing run")
    worker = commands.add_parser("worker", help="run one worker (started by the chaos run itself)")
    worker.add_argument("url")
    worker.add_argument("--hang-on", type=int, default=None)
    worker.add_argument("--work-ms", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.command == "worker":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(work(args.url, args.hang_on, args.work_ms))
        return
    os.chdir(REPO_ROOT)
    sys.exit(asyncio.run(chaos(args)))


if __name__ == "__main__":
    main()
