"""Hold idle subscriber connections open, for ``make bench``'s memory-per-connection figure.

    python -m bench.idle URL COUNT [--warm N] [--topic A]

Opens ``--warm`` subscribers of the topic and says ``WARM``; on ``GO`` (a line
on stdin) opens ``COUNT`` more and says ``HELD COUNT``; on ``STOP`` or end of
stdin closes them all. Each one waits for its SUBSCRIBED before it counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from websockets.asyncio.client import ClientConnection, connect

from bench.stacks import raise_open_files_limit

OPENING_AT_ONCE = 64


async def subscriber(url: str, topic: str, opening: asyncio.Semaphore) -> ClientConnection:
    async with opening:
        ws = await connect(url, compression=None, open_timeout=60)
        await ws.send(json.dumps({"type": "SUBSCRIBE", "topic": topic}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame.get("type") == "SUBSCRIBED":
                return ws
            if frame.get("type") == "ERROR":
                raise RuntimeError(f"SUBSCRIBE {topic}: {frame}")


async def open_many(url: str, topic: str, count: int) -> list[ClientConnection]:
    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    return await asyncio.gather(*(subscriber(url, topic, opening) for _ in range(count)))


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    held = await open_many(args.url, args.topic, args.warm)
    print("WARM", flush=True)
    if (await reader.readline()).strip() == b"GO":
        held += await open_many(args.url, args.topic, args.count)
        print(f"HELD {args.count}", flush=True)
        await reader.readline()  # STOP, or end of stdin
    await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--topic", default="A")
    raise_open_files_limit()
    asyncio.run(main(parser.parse_args()))
