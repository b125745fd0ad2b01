"""Paced RTP load: N concurrent G.711 streams, each from its own UDP source port, in real time.

    python -m bench.rtp_load --port 5004 --streams 300 --seconds 10
    python -m bench.rtp_load --port 5004 --streams 3000 --seconds 60 --processes 2 --ramp 3

Each stream's payload is deterministic (`expected_payload`), so a checker can compare every WAV
sample for sample. Stream i starts `i * ramp / streams` seconds after the start (calls arrive over
time, and their packets are spread over the 20 ms instead of one burst) and sends exactly
`seconds * 1000 / ptime` packets. With `--processes P` the streams are split over P sender
processes started at the same instant. Prints a JSON summary (packets sent, how far the pacing
fell behind).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time

import numpy as np

_HEADER = struct.Struct("!BBHII")


def payload_for(stream: int, length: int, seed: int = 0) -> bytes:
    """The G.711 bytes stream number `stream` sends (the same for sender and checker)."""
    rng = np.random.default_rng([seed, stream])
    return rng.integers(0, 256, length, dtype=np.uint8).tobytes()


def expected_payload(stream: int, packets: int, samples: int, seed: int, period: int) -> bytes:
    """Everything stream `stream` sends: `period` packets of `payload_for` repeated (0: none)."""
    if not period or period >= packets:
        return payload_for(stream, packets * samples, seed)
    cycle = payload_for(stream, period * samples, seed)
    return (cycle * (packets // period + 1))[: packets * samples]


def _send(
    host: str,
    port: int,
    first: int,
    count: int,
    total: int,
    seconds: float,
    ptime_ms: int,
    payload_type: int,
    seed: int,
    period: int,
    ramp: float,
    start_at: float | None,
) -> dict[str, float | int]:
    """Send streams first..first+count-1 (of `total`, which fixes their start offsets)."""
    samples = ptime_ms * 8
    packets = int(seconds * 1000 // ptime_ms)
    cycle_len = period if period and period < packets else packets
    socks, chunks, offsets = [], [], []
    for i in range(first, first + count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host if host.startswith("127.") else "0.0.0.0", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        socks.append(sock)
        cycle = payload_for(i, cycle_len * samples, seed)
        chunks.append([cycle[k * samples : (k + 1) * samples] for k in range(cycle_len)])
        offsets.append(round(i * ramp * 1000 / max(1, total)))  # ms after the start
    # 1 ms slots: slot s sends packet (s - offset) / ptime of every stream whose phase it is.
    by_phase: list[list[int]] = [[] for _ in range(ptime_ms)]
    for j, offset in enumerate(offsets):
        by_phase[offset % ptime_ms].append(j)
    last_slot = (max(offsets) if offsets else 0) + (packets - 1) * ptime_ms
    target = (host, port)
    pack = _HEADER.pack
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    worst_lag = 0.0
    late_slots = 0
    sent = 0
    for slot in range(last_slot + 1):
        due = start + slot / 1000
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        else:
            lag = now - due
            if lag > 0.005:
                late_slots += 1
            worst_lag = max(worst_lag, lag)
        for j in by_phase[slot % ptime_ms]:
            n, rest = divmod(slot - offsets[j], ptime_ms)
            if n < 0 or n >= packets or rest:
                continue
            i = first + j
            header = pack(
                0x80,
                payload_type | (0x80 if n == 0 else 0),
                (1000 * i + n) & 0xFFFF,
                (123456 * i + n * samples) & 0xFFFFFFFF,
                0x10000000 + i,
            )
            socks[j].sendto(header + chunks[j][n % cycle_len], target)
            sent += 1
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close()
    return {
        "streams": count,
        "packets_sent": sent,
        "packets_per_stream": packets,
        "seconds": round(elapsed, 3),
        "packets_per_second": round(sent / elapsed, 1) if elapsed else 0.0,
        "worst_lag_ms": round(worst_lag * 1000, 2),
        "late_slots": late_slots,
    }


def run(
    host: str,
    port: int,
    streams: int,
    seconds: float,
    ptime_ms: int,
    payload_type: int,
    seed: int,
    *,
    processes: int = 1,
    period: int = 0,
    ramp: float = 0.0,
    start_at: float | None = None,
) -> dict[str, float | int]:
    """Send the load, from `processes` separate sender processes when more than one."""
    if processes <= 1:
        return _send(
            host, port, 0, streams, streams, seconds, ptime_ms, payload_type, seed, period,
            ramp, start_at,
        )  # fmt: skip
    # Children need time to open their sockets and build payloads before the common start.
    start_at = start_at if start_at is not None else time.time() + 1.0 + streams / 2000
    procs = []
    share, extra = divmod(streams, processes)
    first = 0
    for p in range(processes):
        count = share + (1 if p < extra else 0)
        args = [
            sys.executable, "-m", "bench.rtp_load", "--host", host, "--port", str(port),
            "--streams", str(count), "--first", str(first), "--total", str(streams),
            "--seconds", str(seconds), "--ptime", str(ptime_ms),
            "--payload-type", str(payload_type), "--seed", str(seed), "--period", str(period),
            "--ramp", str(ramp), "--start-at", repr(start_at),
        ]  # fmt: skip
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, text=True))
        first += count
    parts = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + ramp + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"sender process failed with {proc.returncode}")
        parts.append(json.loads(out))
    elapsed = max(float(p["seconds"]) for p in parts)
    sent = sum(int(p["packets_sent"]) for p in parts)
    return {
        "streams": streams,
        "processes": processes,
        "packets_sent": sent,
        "packets_per_stream": int(parts[0]["packets_per_stream"]),
        "seconds": elapsed,
        "packets_per_second": round(sent / elapsed, 1) if elapsed else 0.0,
        "worst_lag_ms": max(float(p["worst_lag_ms"]) for p in parts),
        "late_slots": sum(int(p["late_slots"]) for p in parts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ptime", type=int, default=20, help="milliseconds per packet")
    parser.add_argument("--payload-type", type=int, default=0, help="0 PCMU, 8 PCMA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="sender processes")
    parser.add_argument(
        "--period", type=int, default=0, help="payload repeats every N packets (0: never)"
    )
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which streams start")
    parser.add_argument("--first", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first is not None:  # one slice, as a child of a multi-process run
        summary = _send(
            args.host, args.port, args.first, args.streams, args.total or args.streams,
            args.seconds, args.ptime, args.payload_type, args.seed, args.period, args.ramp,
            args.start_at,
        )  # fmt: skip
    else:
        summary = run(
            args.host, args.port, args.streams, args.seconds, args.ptime, args.payload_type,
            args.seed, processes=args.processes, period=args.period, ramp=args.ramp,
            start_at=args.start_at,
        )  # fmt: skip
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
