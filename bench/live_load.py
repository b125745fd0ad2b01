"""Live listeners for the benchmark: one `GET /api/taps/{name}/live` WebSocket per recording tap
of a receiver (`--no-auth`), each read as fast as it comes and thrown away; prints a JSON summary
(listeners, frames and bytes received, gap markers, end markers).

    python -m bench.live_load --port 8080 --taps 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp


async def listen(session: aiohttp.ClientSession, url: str, totals: dict[str, Any]) -> None:
    try:
        async with session.ws_connect(url, max_msg_size=0) as ws:
            totals["listeners"] += 1
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    totals["bytes"] += len(message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    kind = json.loads(message.data).get("type")
                    totals[kind] = totals.get(kind, 0) + 1
    except (aiohttp.ClientError, OSError):
        totals["failed"] += 1


async def run(port: int, taps: int, seconds: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    totals: dict[str, Any] = {"listeners": 0, "bytes": 0, "failed": 0}
    connector = aiohttp.TCPConnector(limit=0)
    tasks: dict[str, asyncio.Task[None]] = {}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector) as session:
        while len(tasks) < taps and time.monotonic() < deadline:
            query = {"state": "recording", "limit": "1000"}
            async with session.get(f"{base}/api/taps", params=query) as answer:
                listed = (await answer.json())["taps"]
            for tap in listed:
                name = tap["name"]
                if name not in tasks:
                    url = f"ws://127.0.0.1:{port}/api/taps/{name}/live"
                    tasks[name] = asyncio.create_task(listen(session, url, totals))
            await asyncio.sleep(0.5)
        totals["connected_within_seconds"] = round(seconds - (deadline - time.monotonic()), 2)
        await asyncio.wait(list(tasks.values()), timeout=max(1.0, deadline - time.monotonic()))
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--taps", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="give up after this long")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.port, args.taps, args.seconds))))


if __name__ == "__main__":
    main()
