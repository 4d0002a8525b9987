"""The ``turtlemq`` command line (also ``python -m turtlemq_client``).

    turtlemq submit DATA...            submit tasks (stdin lines without DATA or with -), print results in order
    turtlemq worker --exec "CMD"       run CMD per task: data on its stdin, result from its stdout
    turtlemq topics                    list the topics
    turtlemq subscribe PATTERN...      print the messages of the topics matching PATTERN
    turtlemq publish TOPIC DATA        publish DATA (stdin with -) and print its id
    turtlemq status                    the broker's counts
    turtlemq menu                      the interactive menu of the MessageQueue-System client
    turtlemq bench                     measure the broker (round trips, a burst of tasks, fan-out)

``--url`` (or ``TURTLEMQ_URL``) chooses the broker, ``--token`` (or ``TURTLEMQ_TOKEN``) the access key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from . import bench
from .client import Client
from .connection import DEFAULT_URL, Connection
from .errors import TaskError, TaskFailed, TurtleMQError
from .lines import Lines
from .menu import run_menu
from .subscriber import Subscriber
from .worker import Worker

ONE_SHOT_GIVE_UP_AFTER = 10.0  # topics, publish, status: fail fast when the broker is down
SUBMIT_GIVE_UP_AFTER = 60.0  # submit rides out a broker restart, but not an outage


# --- submit ---------------------------------------------------------------------------


async def _task_data(args: argparse.Namespace) -> AsyncIterator[str]:
    """The tasks to submit, as an async iterator: the DATA arguments, with stdin lines in place of ``-``."""
    for item in args.data or ["-"]:
        if item == "-":
            async for line in Lines():
                yield line
        else:
            yield item


async def cmd_submit(args: argparse.Namespace) -> int:
    """Submit every task at once (up to --max-in-flight), print the results in submission order."""
    give_up = args.give_up_after if args.give_up_after is not None else SUBMIT_GIVE_UP_AFTER
    failures = 0
    async with Client(args.url, client_id=args.client_id, token=args.token, give_up_after=give_up) as client:
        slots = asyncio.Semaphore(args.max_in_flight)
        submitted: asyncio.Queue[asyncio.Task[str] | None] = asyncio.Queue()

        async def one(data: str) -> str:
            try:
                return await client.submit(data, timeout=args.timeout, max_attempts=args.max_attempts)
            finally:
                slots.release()

        async def produce() -> None:
            try:
                async for data in _task_data(args):
                    await slots.acquire()
                    submitted.put_nowait(asyncio.create_task(one(data)))
            finally:
                submitted.put_nowait(None)

        producer = asyncio.create_task(produce())
        try:
            while (task := await submitted.get()) is not None:
                try:
                    print(await task, flush=True)
                except TaskFailed as exc:
                    failures += 1
                    print(f"turtlemq: task failed: {exc.reason}", file=sys.stderr, flush=True)
            await producer
        finally:
            producer.cancel()
            # After an error, the submissions still queued end with the command: stop them,
            # and retrieve their outcome so that asyncio does not report it as lost.
            while not submitted.empty():
                if (pending := submitted.get_nowait()) is None:
                    continue
                if not pending.done():
                    pending.cancel()
                elif not pending.cancelled():
                    pending.exception()  # retrieved, so asyncio does not log it as lost
    return 1 if failures else 0


# --- worker ---------------------------------------------------------------------------


def command_handler(command: str) -> Callable[[str], Awaitable[str]]:
    """A task handler that runs the shell ``command`` with the data on its stdin and returns its stdout.

    One trailing newline of the output is dropped (as shell command substitution does); a non-zero
    exit fails the task with the command's stderr.
    """

    async def run(data: str) -> str:
        process = await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await process.communicate(data.encode())
        except asyncio.CancelledError:
            # The broker took the task back (connection lost): do not leave the command running.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            reason = err.decode(errors="replace").strip()
            raise TaskError(reason or f"{command!r} exited with status {process.returncode}")
        result = out.decode(errors="replace")
        return result[:-1] if result.endswith("\n") else result

    return run


async def cmd_worker(args: argparse.Namespace) -> int:
    worker = Worker(
        args.url,
        command_handler(args.exec),
        concurrency=args.concurrency,
        token=args.token,
        touch_every=args.touch_every,
        give_up_after=args.give_up_after,
    )
    await worker.start()
    print(f"turtlemq: worker registered at {args.url} (concurrency {args.concurrency})", file=sys.stderr, flush=True)
    await worker.run()
    return 0


# --- topics -----------------------------------------------------------------------------


def _one_shot(args: argparse.Namespace) -> Connection:
    give_up = args.give_up_after if args.give_up_after is not None else ONE_SHOT_GIVE_UP_AFTER
    return Connection(args.url, token=args.token, give_up_after=give_up)


async def cmd_topics(args: argparse.Namespace) -> int:
    async with _one_shot(args) as connection:
        for name in await connection.list_topics():
            print(name)
    return 0


async def cmd_publish(args: argparse.Namespace) -> int:
    data = args.data
    if data == "-":
        data = sys.stdin.read()
        data = data[:-1] if data.endswith("\n") else data  # the newline that ends the input is not the message's
    async with _one_shot(args) as connection:
        print(await connection.publish(args.topic, data))
    return 0


def format_message(topic: str, message_id: int, data: str) -> str:
    """How ``subscribe`` prints a message."""
    return f"[{topic} #{message_id}] {data}"


async def cmd_subscribe(args: argparse.Namespace) -> int:
    subscriber = Subscriber(
        args.url, args.patterns, email=args.email, since=args.since, token=args.token, give_up_after=args.give_up_after
    )
    async with subscriber:
        for pattern in args.patterns:
            print(f"turtlemq: subscribed to {pattern}", file=sys.stderr, flush=True)
        received = 0
        async for message in subscriber:
            if args.json:
                line = json.dumps({"topic": message.topic, "id": message.id, "data": message.data})
            else:
                line = format_message(message.topic, message.id, message.data)
            print(line, flush=True)
            received += 1
            if args.count is not None and received >= args.count:
                break
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with _one_shot(args) as connection:
        counts = await connection.status()
    if args.json:
        print(json.dumps(counts))
    else:
        for name, value in counts.items():
            print(f"{name}: {value}")
    return 0


async def cmd_menu(args: argparse.Namespace) -> int:
    give_up = args.give_up_after if args.give_up_after is not None else ONE_SHOT_GIVE_UP_AFTER
    await run_menu(args.url, token=args.token, give_up_after=give_up)
    return 0


# --- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; the connection options are accepted before or after the command."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the broker's WebSocket URL (default: $TURTLEMQ_URL or {DEFAULT_URL})",
    )
    connection.add_argument(
        "--token", default=argparse.SUPPRESS, help="access key, sent as ?token= (default: $TURTLEMQ_TOKEN)"
    )
    connection.add_argument(
        "--give-up-after",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="fail after this long without a connection (default: 10 s for one-shot commands, 60 s for submit, "
        "never for worker and subscribe)",
    )

    parser = argparse.ArgumentParser(prog="turtlemq", description="Talk to a TurtleMQ broker.", parents=[connection])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", parents=[connection], help="submit tasks and print their results")
    submit.add_argument("data", nargs="*", metavar="DATA", help="task data; none or - reads one task per stdin line")
    submit.add_argument("--timeout", type=float, help="lease in seconds: how long a worker may hold a task")
    submit.add_argument("--max-attempts", type=int, help="attempt limit of each task")
    submit.add_argument("--client-id", help="a stable clientId (default: a random one)")
    submit.add_argument("--max-in-flight", type=int, default=1000, help="tasks submitted but unanswered at most")
    submit.set_defaults(run=cmd_submit)

    worker = commands.add_parser("worker", parents=[connection], help="work on tasks with a shell command")
    worker.add_argument("--exec", required=True, metavar="CMD", help="run per task: data on stdin, result = stdout")
    worker.add_argument("--concurrency", type=int, default=1, help="tasks run at once (default 1)")
    worker.add_argument("--touch-every", type=float, metavar="SECONDS", help="renew a running task's lease this often")
    worker.set_defaults(run=cmd_worker)

    topics = commands.add_parser("topics", parents=[connection], help="list the topics")
    topics.set_defaults(run=cmd_topics)

    subscribe = commands.add_parser("subscribe", parents=[connection], help="print the messages of topics")
    subscribe.add_argument("patterns", nargs="+", metavar="PATTERN", help="topic name, or pattern with * and #")
    subscribe.add_argument("--email", help="also register this address for e-mail updates")
    subscribe.add_argument("--since", type=int, help="first replay the stored messages with a higher id")
    subscribe.add_argument("--count", type=int, help="exit after this many messages")
    subscribe.add_argument("--json", action="store_true", help="print each message as a JSON object")
    subscribe.set_defaults(run=cmd_subscribe)

    publish = commands.add_parser("publish", parents=[connection], help="publish a message and print its id")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("data", metavar="DATA", help="the message; - reads it from stdin")
    publish.set_defaults(run=cmd_publish)

    status = commands.add_parser("status", parents=[connection], help="show the broker's counts")
    status.add_argument("--json", action="store_true", help="print the counts as JSON")
    status.set_defaults(run=cmd_status)

    menu = commands.add_parser("menu", parents=[connection], help="the interactive topics menu")
    menu.set_defaults(run=cmd_menu)

    bench.add_parser(commands, [connection])
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, filling the connection options from the environment."""
    args = build_parser().parse_args(argv)
    args.url = getattr(args, "url", None) or os.environ.get("TURTLEMQ_URL") or DEFAULT_URL
    args.token = getattr(args, "token", None) or os.environ.get("TURTLEMQ_TOKEN") or None
    args.give_up_after = getattr(args, "give_up_after", None)
    return args


async def _main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM stops as Ctrl-C does: the connection closes cleanly, so a worker's tasks go back at once.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await args.run(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``turtlemq`` command."""
    args = parse_args(argv)
    try:
        status = getattr(args, "run_loop", asyncio.run)(_main(args))  # bench runs on uvloop when installed
    except KeyboardInterrupt:
        status = 130
    except asyncio.CancelledError:
        status = 143  # SIGTERM
    except TurtleMQError as exc:
        print(f"turtlemq: error: {exc}", file=sys.stderr)
        status = 1
    sys.exit(status)
