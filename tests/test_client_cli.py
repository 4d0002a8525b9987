"""The ``turtlemq`` command line, run as subprocesses against a real broker process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.servers import REPO_ROOT, Stack, embedded_stack, free_port
from turtlemq_client import Worker, publish

pytestmark = pytest.mark.e2e

PIPE = asyncio.subprocess.PIPE


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with embedded_stack(tmp_path_factory.mktemp("client-cli")) as running:
        yield running


class Cli:
    """A running ``python -m turtlemq_client`` process whose output is read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, *args: str) -> Cli:
        env = {**os.environ, "TURTLEMQ_URL": url, "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turtlemq_client", *args, cwd=REPO_ROOT, env=env, stdin=PIPE, stdout=PIPE, stderr=PIPE
        )
        return cls(process)

    async def read_until(self, text: str, *, stream: str = "stdout", timeout: float = 20.0) -> list[str]:
        """The lines read up to and including the first one containing ``text``."""
        reader = self.process.stdout if stream == "stdout" else self.process.stderr
        assert reader is not None
        lines: list[str] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            line = await asyncio.wait_for(reader.readline(), max(remaining, 0.01))
            if not line:
                raise AssertionError(f"{stream} ended before {text!r}; read {lines}")
            lines.append(line.decode().rstrip("\n"))
            if text in lines[-1]:
                return lines

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()

    async def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        """Close stdin and wait for the exit: (status, rest of stdout, rest of stderr)."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def run(url: str, *args: str, stdin: str = "", timeout: float = 30.0) -> tuple[int, str, str]:
    """Run one command to its end: (status, stdout, stderr)."""
    cli = await Cli.start(url, *args)
    try:
        assert cli.process.stdin is not None
        cli.process.stdin.write(stdin.encode())
        return await cli.finish(timeout)
    finally:
        cli.kill()


async def test_submit_prints_the_results_of_stdin_lines_in_order_from_a_worker_running_a_command(broker):
    worker = await Cli.start(broker.client_url, "worker", "--exec", "tr a-z A-Z", "--concurrency", "2")
    try:
        await worker.read_until("worker registered", stream="stderr")
        status, out, err = await run(broker.client_url, "submit", stdin="alpha\nbeta\n\ngamma delta\n")
        assert (status, out, err) == (0, "ALPHA\nBETA\n\nGAMMA DELTA\n", "")
        status, out, _ = await run(broker.client_url, "submit", "one", "-", "three", stdin="two\n")
        assert (status, out) == (0, "ONE\nTWO\nTHREE\n")
        worker.process.send_signal(signal.SIGTERM)
        assert (await worker.finish())[0] == 143
    finally:
        worker.kill()


async def test_a_command_that_exits_non_zero_fails_the_task_with_its_stderr(broker):
    worker = await Cli.start(broker.client_url, "worker", "--exec", "echo out of cheese >&2; exit 3")
    try:
        await worker.read_until("worker registered", stream="stderr")
        status, out, err = await run(broker.client_url, "submit", "--max-attempts", "2", "anything")
        assert (status, out) == (1, "")
        assert "task failed: out of cheese" in err
    finally:
        worker.kill()
        await worker.process.wait()


async def test_status_prints_the_broker_counts(broker):
    async def echo(data: str) -> str:
        return data

    async with Worker(broker.client_url, echo):
        status, out, _ = await run(broker.client_url, "status", "--json", "--token", "accepted-while-auth-is-off")
        assert status == 0
        counts = json.loads(out)
        assert {"idleWorkers", "busyWorkers", "queuedTasks", "runningTasks"} <= set(counts)
        assert counts["idleWorkers"] >= 1
        status, out, _ = await run(broker.client_url, "status")
        assert status == 0 and "idleWorkers: " in out


async def test_a_command_gives_up_on_an_unreachable_broker_with_an_error():
    url = f"ws://127.0.0.1:{free_port()}/"
    status, out, err = await run(url, "status", "--give-up-after", "0.5")
    assert (status, out) == (1, "")
    assert err.startswith("turtlemq: error: could not connect to")


async def test_topics_lists_the_topic_names(broker):
    status, out, _ = await run(broker.client_url, "topics")
    assert status == 0
    names = out.splitlines()
    assert names == sorted(names) and {"Django", "NodeJs", "React", "SpringBoot"} <= set(names)


async def test_subscribe_prints_the_messages_that_publish_sends(broker):
    subscriber = await Cli.start(broker.client_url, "subscribe", "NodeJs", "--count", "2")
    try:
        await subscriber.read_until("subscribed to NodeJs", stream="stderr")
        status, first, _ = await run(broker.client_url, "publish", "NodeJs", "hello")
        assert status == 0
        status, second, _ = await run(broker.client_url, "publish", "NodeJs", "-", stdin="from stdin\n")
        assert status == 0
        assert int(second) == int(first) + 1
        status, out, _ = await subscriber.finish()
        assert (status, out) == (0, f"[NodeJs #{int(first)}] hello\n[NodeJs #{int(second)}] from stdin\n")
    finally:
        subscriber.kill()


async def test_publishing_to_an_unknown_topic_fails_with_its_error_code(broker):
    status, out, err = await run(broker.client_url, "publish", "NoSuchTopic", "x")
    assert (status, out) == (1, "")
    assert err.startswith("turtlemq: error: UNKNOWN_TOPIC: ")


def active_email_subscriptions(stack: Stack, topic: str, address: str) -> int:
    code = (
        "from subscriptions.models import Subscription\n"
        f"print(Subscription.objects.filter(topic__name={topic!r}, address={address!r}, active=True).count())"
    )
    return int(stack.manage("shell", "--no-imports", "-c", code).stdout)


async def test_the_menu_driven_through_stdin_lists_subscribes_publishes_and_unsubscribes_on_quit(broker):
    address = "menu.user@example.com"
    menu = await Cli.start(broker.client_url, "menu")
    try:
        await menu.read_until("Choice")
        await menu.send("1")
        assert "  3. React" in await menu.read_until("Choice")
        await menu.send("3")
        assert "Subscribe to a topic first (2)." in await menu.read_until("Choice")

        await menu.send("2")
        await menu.read_until("Topic (name or number):")
        await menu.send("React")
        await menu.read_until("Your e-mail address:")
        await menu.send("not-an-address")
        assert "'not-an-address' is not a valid e-mail address." in await menu.read_until("Choice")

        await menu.send("2")
        await menu.read_until("Topic (name or number):")
        await menu.send("3")  # by number: React
        await menu.read_until("Your e-mail address:")
        await menu.send(address)
        lines = await menu.read_until("Live updates of React follow.")
        assert f"Subscribed to React as {address}. Current content:" in lines
        assert await asyncio.to_thread(active_email_subscriptions, broker, "React", address) == 1

        elsewhere = await publish(broker.client_url, "React", "from elsewhere")
        await menu.read_until(f"[React #{elsewhere}] from elsewhere")
        await menu.send("3")
        await menu.read_until("Update for React:")
        await menu.send("from the menu")
        lines = await menu.read_until("to React.")
        assert lines[-1] == f"Published update #{elsewhere + 1} to React."
        await menu.read_until(f"[React #{elsewhere + 1}] from the menu")

        await menu.send("4")
        await menu.read_until("q. Quit")
        await menu.send("q")
        status, out, _ = await menu.finish()
        assert status == 0
        assert out.splitlines()[-2:] == [f"Unsubscribed {address} from React.", "Bye."]
        assert await asyncio.to_thread(active_email_subscriptions, broker, "React", address) == 0
    finally:
        menu.kill()
