"""Paced RTP load: N concurrent G.711 (or G.722, or Opus) streams, each from its own UDP source
port, in real time.

    python -m bench.rtp_load --port 5004 --streams 300 --seconds 10
    python -m bench.rtp_load --port 5004 --streams 3000 --seconds 60 --processes 2 --ramp 3
    python -m bench.rtp_load --port 5004 --streams 300 --seconds 10 --codec opus

`--codec g722` sends random bytes (every byte string is G.722) on PT 9, 8 kHz RTP clock; `--codec
opus` sends real libopus packets (32 kbit/s hard CBR, so every packet is 80 bytes; made once by
`opus_cycle`, the same for every stream) on PT 111, 48 kHz RTP clock.

Each stream's payload is deterministic (`expected_payload`), so a checker can compare every WAV
sample for sample. Stream i starts `i * ramp / streams` seconds after the start (calls arrive over
time, and their packets are spread over the 20 ms instead of one burst) and sends exactly
`seconds * 1000 / ptime` packets. With `--processes P` the streams are split over P sender
processes started at the same instant. Prints a JSON summary (packets sent, how far the pacing
fell behind).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

_LIBC = ctypes.CDLL(None, use_errno=True)


# sendmmsg(2)'s structures as Linux lays them out (struct iovec, msghdr, mmsghdr): the sender's
# own, not the receiver's (receiver.rtp.datagrams has private ones for recvmmsg).
class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


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


@dataclass(frozen=True)
class Codec:
    payload_type: int
    bytes_per_ms: int  # payload bytes per millisecond of audio
    clock_per_ms: int  # RTP timestamp ticks per millisecond
    frames_per_ms: int  # WAV frames per millisecond (the recording's rate / 1000)


CODECS = {
    "pcmu": Codec(0, 8, 8, 8),
    "pcma": Codec(8, 8, 8, 8),
    "g722": Codec(9, 8, 8, 16),
    "opus": Codec(111, 4, 48, 48),
}
OPUS_SEED_SIGNAL = 300.0  # Hz: the tone (with a little noise) the Opus packets carry


def opus_cycle(packets: int, ptime_ms: int, seed: int) -> list[bytes]:
    """`packets` consecutive Opus packets of `ptime_ms` (hard CBR: all the same size)."""
    import opuslib_next  # the receiver's own dependency; only this codec needs it

    encoder = opuslib_next.Encoder(48000, 1, "voip")
    encoder.bitrate = CODECS["opus"].bytes_per_ms * 8000
    encoder.vbr = 0
    frame = 48 * ptime_ms
    t = np.arange(frame * packets) / 48000
    rng = np.random.default_rng(seed)
    signal = 6000 * np.sin(2 * np.pi * OPUS_SEED_SIGNAL * t) + 300 * rng.standard_normal(len(t))
    pcm = signal.astype(np.int16)
    frames = [pcm[k * frame : (k + 1) * frame].tobytes() for k in range(packets)]
    out = [encoder.encode(f, frame) for f in frames]
    sizes = {len(p) for p in out}
    assert sizes == {CODECS["opus"].bytes_per_ms * ptime_ms}, sizes
    return out


def stream_cycle(codec: str, stream: int, packets: int, ptime_ms: int, seed: int) -> bytes:
    """The payloads stream `stream` sends, `packets` of them back to back (all one size)."""
    if codec == "opus":
        return b"".join(opus_cycle(packets, ptime_ms, seed))
    return payload_for(stream, packets * CODECS[codec].bytes_per_ms * ptime_ms, seed)


@lru_cache(maxsize=1)
def _opus_bytes(packets: int, ptime_ms: int, seed: int) -> bytes:
    return b"".join(opus_cycle(packets, ptime_ms, seed))


def _cycle(codec: str, stream: int, packets: int, ptime_ms: int, seed: int) -> bytes:
    if codec == "opus":  # the same packets for every stream: encoded once
        return _opus_bytes(packets, ptime_ms, seed)
    return stream_cycle(codec, stream, packets, ptime_ms, seed)


class _Pacer:
    """1 ms slots in real time from `start_at` (a time.time()), and how far behind they ran."""

    def __init__(self, start_at: float | None) -> None:
        self.start_at = start_at
        self.worst_lag = 0.0
        self.late_slots = 0
        self.elapsed = 0.0

    def slots(self, last_slot: int) -> Iterator[int]:
        if self.start_at is not None:
            time.sleep(max(0.0, self.start_at - time.time()))
        start = time.perf_counter()
        for slot in range(last_slot + 1):
            due = start + slot / 1000
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            else:
                lag = now - due
                if lag > 0.005:
                    self.late_slots += 1
                self.worst_lag = max(self.worst_lag, lag)
            yield slot
        self.elapsed = time.perf_counter() - start

    def summary(self, streams: int, sent: int, packets: int, sender: str) -> dict[str, Any]:
        return {
            "streams": streams,
            "packets_sent": sent,
            "packets_per_stream": packets,
            "seconds": round(self.elapsed, 3),
            "packets_per_second": round(sent / self.elapsed, 1) if self.elapsed else 0.0,
            "worst_lag_ms": round(self.worst_lag * 1000, 2),
            "late_slots": self.late_slots,
            "sender": sender,
        }


RAW_BASE_PORT = 20000  # stream i of the raw sender comes from 127.0.0.1:(RAW_BASE_PORT + i)


def raw_socket() -> socket.socket | None:
    """A raw IPv4 socket (CAP_NET_RAW), or None where this process may not open one."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        return None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    return sock


class _RawBatch:
    """Up to `capacity` whole IPv4/UDP/RTP packets in one buffer, sent with one sendmmsg(2):
    one system call per 1 ms slot instead of one per packet, so one core can offer 150k+
    packets/s. Each stream still has its own source port: the receiver sees what distinct
    sender sockets would send."""

    def __init__(self, capacity: int, size: int, host: str, port: int) -> None:
        self.rows = np.zeros((capacity, size), np.uint8)
        address = ipaddress.IPv4Address(host).packed
        self._name = ctypes.create_string_buffer(
            struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + address + bytes(8)
        )
        base = self.rows.ctypes.data
        self._iovecs = (_Iovec * capacity)()
        self._messages = (_Mmsghdr * capacity)()
        for i in range(capacity):
            self._iovecs[i].iov_base = base + i * size
            self._iovecs[i].iov_len = size
            header = self._messages[i].msg_hdr
            header.msg_name = ctypes.addressof(self._name)
            header.msg_namelen = 16
            header.msg_iov = ctypes.pointer(self._iovecs[i])
            header.msg_iovlen = 1
        self._sendmmsg = _LIBC.sendmmsg
        self._sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]

    def send(self, fd: int, count: int) -> None:
        done = 0
        while done < count:
            sent = self._sendmmsg(fd, ctypes.addressof(self._messages[done]), count - done, 0)
            if sent < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOBUFS, errno.EAGAIN, errno.EINTR):
                    time.sleep(0.0002)
                    continue
                raise OSError(err, os.strerror(err))
            done += sent


def _send_raw(
    sock: socket.socket,
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
    codec: str = "pcmu",
) -> dict[str, Any]:
    """`_send` over one raw socket: the same packets, timing and summary."""
    samples = ptime_ms * CODECS[codec].bytes_per_ms  # payload bytes
    ticks = ptime_ms * CODECS[codec].clock_per_ms
    packets = int(seconds * 1000 // ptime_ms)
    cycle_len = period if period and period < packets else packets
    streams = np.arange(first, first + count, dtype=np.int64)
    cycles = np.empty((count, cycle_len, samples), np.uint8)
    for local in range(count):
        cycle = _cycle(codec, first + local, cycle_len, ptime_ms, seed)
        cycles[local] = np.frombuffer(cycle, np.uint8).reshape(cycle_len, samples)
    offsets = np.round(streams * ramp * 1000 / max(1, total)).astype(np.int64)
    size = 28 + 12 + samples
    # IPv4 (the kernel fills in the total length, id and checksum) and UDP (no checksum)
    headers = np.zeros((count, 40), np.uint8)
    headers[:, 0], headers[:, 8], headers[:, 9] = 0x45, 64, socket.IPPROTO_UDP
    headers[:, 12:16] = np.frombuffer(socket.inet_aton(host), np.uint8)  # from the same host
    headers[:, 16:20] = np.frombuffer(socket.inet_aton(host), np.uint8)
    headers[:, 20:22] = _be(RAW_BASE_PORT + streams, 2)
    headers[:, 22:24] = _be(np.full(count, port), 2)
    headers[:, 24:26] = _be(np.full(count, size - 20), 2)
    headers[:, 28] = 0x80
    headers[:, 36:40] = _be(0x10000000 + streams, 4)
    by_phase = [np.flatnonzero(offsets % ptime_ms == phase) for phase in range(ptime_ms)]
    batch = _RawBatch(max(len(p) for p in by_phase) or 1, size, host, port)
    rows, fd = batch.rows, sock.fileno()
    last_slot = (int(offsets.max()) if count else 0) + (packets - 1) * ptime_ms
    pacer, sent = _Pacer(start_at), 0
    for slot in pacer.slots(last_slot):
        phase = by_phase[slot % ptime_ms]
        numbers = (slot - offsets[phase]) // ptime_ms
        live = (numbers >= 0) & (numbers < packets)
        j, n = phase[live], numbers[live]
        k = len(j)
        if not k:
            continue
        out = rows[:k]
        out[:, :40] = headers[j]
        out[:, 29] = payload_type | np.where(n == 0, 0x80, 0)
        out[:, 30:32] = _be((1000 * streams[j] + n) & 0xFFFF, 2)
        out[:, 32:36] = _be((123456 * streams[j] + n * ticks) & 0xFFFFFFFF, 4)
        out[:, 40:] = cycles[j, n % cycle_len]
        batch.send(fd, k)
        sent += k
    sock.close()
    return pacer.summary(count, sent, packets, "raw")


def _be(values: np.ndarray, width: int) -> np.ndarray:
    """Big-endian bytes of each value: shape (len(values), width)."""
    return values.astype(f">u{width}").view(np.uint8).reshape(-1, width)


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
    sender: str = "auto",
    codec: str = "pcmu",
) -> dict[str, Any]:
    """Send streams first..first+count-1 (of `total`, which fixes their start offsets).

    `sender`: "raw" (one raw socket, sendmmsg per slot), "sockets" (a UDP socket per stream,
    sendto per packet) or "auto" (raw where this process may open a raw socket)."""
    raw = raw_socket() if sender != "sockets" and host.startswith("127.") else None
    if sender == "raw" and raw is None:
        raise SystemExit("--sender raw needs CAP_NET_RAW and a 127.x host")
    if raw is not None:
        return _send_raw(
            raw, host, port, first, count, total, seconds, ptime_ms, payload_type, seed, period,
            ramp, start_at, codec,
        )  # fmt: skip
    samples = ptime_ms * CODECS[codec].bytes_per_ms  # payload bytes
    ticks = ptime_ms * CODECS[codec].clock_per_ms
    packets = int(seconds * 1000 // ptime_ms)
    cycle_len = period if period and period < packets else packets
    socks, chunks, offsets = [], [], []
    for i in range(first, first + count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host if host.startswith("127.") else "0.0.0.0", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        socks.append(sock)
        cycle = _cycle(codec, i, cycle_len, ptime_ms, seed)
        chunks.append([cycle[k * samples : (k + 1) * samples] for k in range(cycle_len)])
        offsets.append(round(i * ramp * 1000 / max(1, total)))  # ms after the start
    # 1 ms slots: slot s sends packet (s - offset) / ptime of every stream whose phase it is.
    by_phase: list[list[int]] = [[] for _ in range(ptime_ms)]
    for j, offset in enumerate(offsets):
        by_phase[offset % ptime_ms].append(j)
    last_slot = (max(offsets) if offsets else 0) + (packets - 1) * ptime_ms
    target = (host, port)
    pack = _HEADER.pack
    pacer, sent = _Pacer(start_at), 0
    for slot in pacer.slots(last_slot):
        for j in by_phase[slot % ptime_ms]:
            n, rest = divmod(slot - offsets[j], ptime_ms)
            if n < 0 or n >= packets or rest:
                continue
            i = first + j
            header = pack(
                0x80,
                payload_type | (0x80 if n == 0 else 0),
                (1000 * i + n) & 0xFFFF,
                (123456 * i + n * ticks) & 0xFFFFFFFF,
                0x10000000 + i,
            )
            socks[j].sendto(header + chunks[j][n % cycle_len], target)
            sent += 1
    for sock in socks:
        sock.close()
    return pacer.summary(count, sent, packets, "sockets")


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
    sender: str = "auto",
    codec: str = "pcmu",
) -> dict[str, Any]:
    """Send the load, from `processes` separate sender processes when more than one."""
    if processes <= 1:
        return _send(
            host, port, 0, streams, streams, seconds, ptime_ms, payload_type, seed, period,
            ramp, start_at, sender, codec,
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
            "--ramp", str(ramp), "--start-at", repr(start_at), "--sender", sender,
            "--codec", codec,
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
        "sender": str(parts[0]["sender"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ptime", type=int, default=20, help="milliseconds per packet")
    parser.add_argument("--payload-type", type=int, default=None,
                        help="default: the codec's (0, 8, 9 or 111)")  # fmt: skip
    parser.add_argument("--codec", choices=sorted(CODECS), default="pcmu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="sender processes")
    parser.add_argument(
        "--period", type=int, default=0, help="payload repeats every N packets (0: never)"
    )
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which streams start")
    parser.add_argument("--first", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sender", choices=("auto", "raw", "sockets"), default="auto",
        help="raw: one raw socket and sendmmsg (needs CAP_NET_RAW); sockets: a socket per stream",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.payload_type is None:
        args.payload_type = CODECS[args.codec].payload_type
    if args.first is not None:  # one slice, as a child of a multi-process run
        summary = _send(
            args.host, args.port, args.first, args.streams, args.total or args.streams,
            args.seconds, args.ptime, args.payload_type, args.seed, args.period, args.ramp,
            args.start_at, args.sender, args.codec,
        )  # fmt: skip
    else:
        summary = run(
            args.host, args.port, args.streams, args.seconds, args.ptime, args.payload_type,
            args.seed, processes=args.processes, period=args.period, ramp=args.ramp,
            start_at=args.start_at, sender=args.sender, codec=args.codec,
        )  # fmt: skip
    json.dump(summary, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
