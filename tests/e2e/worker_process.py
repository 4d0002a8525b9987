"""A stand-alone worker for end-to-end tests, run as its own process so it can be SIGKILLed.

It upper-cases each task's data. Tasks whose data starts with ``--hold-prefix``
are held forever (never answered), so that a test can kill the worker mid-task.
It prints ``READY`` once registered and ``GOT <taskId> <data>`` per task.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import websockets


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--hold-prefix", default=None)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(work(args.url, args.hold_prefix, args.concurrency))


if __name__ == "__main__":
    main()
