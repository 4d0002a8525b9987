"""A stand-alone worker for end-to-end tests, run as its own process so it can be SIGKILLed.

It upper-cases each task's data. Tasks whose data starts with ``--hold-prefix``
are held forever (never answered), so that a test can kill the worker mid-task.
It prints ``READY`` once registered and ``GOT <taskId> <data>`` per task.
Run it as ``python -m tests.e2e.worker_process URL`` from the repository root.

:class:`WorkerProcess` is the test's handle on such a process: it starts it,
reads those lines as they come and kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

import websockets

from tests.e2e.peers import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


async def work(url: str, hold_prefix: str | None, concurrency: int) -> None:
    async with websockets.connect(url, max_size=None) as connection:
        register = {"type": "REGISTER_WORKER", "data": "", "concurrency": concurrency}
        await connection.send(json.dumps(register))
        assert json.loads(await connection.recv())["type"] == "REGISTER_WORKER"
        print("READY", flush=True)
        async for raw in connection:
            frame = json.loads(raw)
            if frame["type"] != "REQUEST_TASK":
                continue
            print("GOT", frame["taskId"], frame["data"], flush=True)
            if hold_prefix is not None and frame["data"].startswith(hold_prefix):
                continue
            reply = {"type": "RESPONSE_TASK", "taskId": frame["taskId"], "data": frame["data"].upper()}
            await connection.send(json.dumps(reply))


class WorkerProcess:
    """A running worker process and the lines it printed so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, url: str, *, hold_prefix: str | None = None, concurrency: int = 1, timeout: float = 10.0
    ) -> WorkerProcess:
        """Start a worker on ``url`` and wait until it registered."""
        args = [sys.executable, "-m", "tests.e2e.worker_process", url, "--concurrency", str(concurrency)]
        if hold_prefix is not None:
            args += ["--hold-prefix", hold_prefix]
        handle = cls(await asyncio.create_subprocess_exec(*args, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE))
        await wait_until(lambda: "READY" in handle.lines or handle._reading.done(), timeout, "the worker's READY")
        assert "READY" in handle.lines, f"worker exited with {await handle.process.wait()} before READY"
        return handle

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))

    @property
    def got(self) -> list[tuple[str, str]]:
        """(taskId, data) of every task it received, in order."""
        return [tuple(line.split(" ", 2)[1:]) for line in self.lines if line.startswith("GOT ")]  # type: ignore[misc]

    async def wait_for_tasks(self, count: int, timeout: float = 10.0) -> list[tuple[str, str]]:
        """Wait until it printed at least ``count`` GOT lines; return them all."""
        await wait_until(lambda: len(self.got) >= count, timeout, f"{count} GOT lines (have {self.lines})")
        return self.got

    def send_signal(self, sig: int) -> None:
        """Signal the process without waiting (SIGSTOP freezes it: a peer that vanished without closing)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL: the process dies without closing its WebSocket."""
        await self.stop(signal.SIGKILL)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the process and read the rest of its output."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        await asyncio.wait_for(self.process.wait(), 10)
        await asyncio.wait_for(self._reading, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--hold-prefix", default=None)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(work(args.url, args.hold_prefix, args.concurrency))


if __name__ == "__main__":
    main()
