"""Paced RTP load: N concurrent G.711 streams, each from its own UDP source port, in real time.

    python -m bench.rtp_load --port 5004 --streams 300 --seconds 10

Each stream's payload is deterministic (`payload_for`), so a checker can compare every WAV
sample for sample. Prints a JSON summary (packets sent, how far the pacing fell behind).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import numpy as np

from receiver.rtp.packet import RtpPacket


def payload_for(stream: int, length: int, seed: int = 0) -> bytes:
    """The G.711 bytes stream number `stream` sends (the same for sender and checker)."""
    rng = np.random.default_rng([seed, stream])
    return rng.integers(0, 256, length, dtype=np.uint8).tobytes()


def run(
    host: str, port: int, streams: int, seconds: float, ptime_ms: int, payload_type: int, seed: int
) -> dict[str, float | int]:
    samples = ptime_ms * 8
    packets_per_stream = int(seconds * 1000 // ptime_ms)
    socks = []
    for _ in range(streams):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host if host.startswith("127.") else "0.0.0.0", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        socks.append(sock)
    # Pre-build every datagram: the sender must not be the bottleneck it measures.
    datagrams: list[list[bytes]] = []
    for i in range(streams):
        payload = payload_for(i, samples * packets_per_stream, seed)
        ssrc = 0x10000000 + i
        datagrams.append(
            [
                RtpPacket(
                    payload_type=payload_type,
                    marker=n == 0,
                    sequence=(1000 * i + n) & 0xFFFF,
                    timestamp=(123456 * i + n * samples) & 0xFFFFFFFF,
                    ssrc=ssrc,
                    payload=payload[n * samples : (n + 1) * samples],
                ).serialize()
                for n in range(packets_per_stream)
            ]
        )
    target = (host, port)
    start = time.perf_counter()
    worst_lag = 0.0
    sent = 0
    for n in range(packets_per_stream):
        due = start + n * ptime_ms / 1000
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        else:
            worst_lag = max(worst_lag, now - due)
        for i, sock in enumerate(socks):
            sock.sendto(datagrams[i][n], target)
        sent += streams
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close()
    return {
        "streams": streams,
        "packets_sent": sent,
        "packets_per_stream": packets_per_stream,
        "seconds": round(elapsed, 3),
        "packets_per_second": round(sent / elapsed, 1),
        "worst_lag_ms": round(worst_lag * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ptime", type=int, default=20, help="milliseconds per packet")
    parser.add_argument("--payload-type", type=int, default=0, help="0 PCMU, 8 PCMA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run(
        args.host, args.port, args.streams, args.seconds, args.ptime, args.payload_type, args.seed
    )
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
