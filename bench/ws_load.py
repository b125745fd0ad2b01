"""Paced WebSocket load: N raw taps (aiohttp clients), each sending a 160-byte binary frame
every 20 ms, in real time, from this process.

    python -m bench.ws_load --url ws://127.0.0.1:8080 --taps 1000 --seconds 20

Tap i is `<prefix>-<i>` and sends `expected_payload(i, frames, 160, seed, period)` (see
bench.rtp_load), so every WAV can be compared sample for sample. Connections are opened at
`--connect-rate` per second; the paced sending starts when all are open. Frames are written to the
connection's transport pre-framed (masked with a zero key, which RFC 6455 allows), so the sender
spends its core on the sockets, not on framing. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import uvloop

from bench.rtp_load import payload_for

FRAME = 160
_HEAD = bytes([0x82, 0x80 | 126]) + FRAME.to_bytes(2, "big") + bytes(4)  # binary, masked, key 0


async def _run(
    url: str, taps: int, seconds: float, seed: int, period: int, prefix: str, connect_rate: float
) -> dict[str, Any]:
    frames = int(seconds * 50)
    cycle_len = period if period and period < frames else frames
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    indices: list[int] = []
    payloads: list[list[bytes]] = []
    failed_connects = 0
    started = time.perf_counter()
    batch = max(1, int(connect_rate / 20))
    for first in range(0, taps, batch):
        tasks = [
            session.ws_connect(f"{url}/tap/{prefix}-{i}", autoping=True, max_msg_size=0)
            for i in range(first, min(taps, first + batch))
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results, start=first):
            if isinstance(result, BaseException):
                failed_connects += 1
            else:
                sockets.append(result)
                indices.append(i)
        await asyncio.sleep(
            max(0.0, started + (first + batch) / connect_rate - time.perf_counter())
        )
    for i in indices:
        cycle = payload_for(i, cycle_len * FRAME, seed)
        payloads.append([_HEAD + cycle[k * FRAME : (k + 1) * FRAME] for k in range(cycle_len)])
    transports = [ws._writer.transport for ws in sockets]
    # Spread the connections over the 20 ms like independent calls.
    groups: list[list[int]] = [list(range(g, len(sockets), 20)) for g in range(20)]
    start = time.perf_counter()
    worst_lag = 0.0
    sent = 0
    for slot in range(frames * 20):
        due = start + slot / 1000
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            worst_lag = max(worst_lag, now - due)
            if slot % 20 == 0:
                await asyncio.sleep(0)  # let the loop read pings and flush
        n = slot // 20
        for j in groups[slot % 20]:
            transports[j].write(payloads[j][n % cycle_len])
            sent += 1
    elapsed = time.perf_counter() - start
    backlog = max((t.get_write_buffer_size() for t in transports), default=0)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    await session.close()
    return {
        "taps": len(sockets),
        "indices": indices,
        "failed_connects": failed_connects,
        "frames_per_tap": frames,
        "frames_sent": sent,
        "seconds": round(elapsed, 3),
        "frames_per_second": round(sent / elapsed, 1) if elapsed else 0.0,
        "worst_lag_ms": round(worst_lag * 1000, 2),
        "max_write_backlog": backlog,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://host:port (no path)")
    parser.add_argument("--taps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--period", type=int, default=0)
    parser.add_argument("--prefix", default="ws-bench")
    parser.add_argument("--connect-rate", type=float, default=500.0)
    args = parser.parse_args(argv)
    summary = uvloop.run(
        _run(args.url, args.taps, args.seconds, args.seed, args.period, args.prefix,
             args.connect_rate)
    )  # fmt: skip
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
