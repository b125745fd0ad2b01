"""An RTP flood from 50 000 distinct sources against a server capped at 2 000 streams: the cap
holds, refusals are counted, memory stays bounded, the server still answers /healthz after it,
and a legitimate stream that started before the flood is recorded sample for sample.

Outcomes only: how fast the server answers during the flood, or how often, depends on the
machine and is not asserted (a busy 2-core machine may answer /healthz once in seconds)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.rtp_load import payload_for
from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    ServerProcess,
    assert_header_matches_data,
    read_wav,
    wait_for_health,
    wait_for_sidecar,
    wait_until,
)

MAX_STREAMS = 2000
FLOOD_SOURCES = 50_000
FLOOD_ADDRESSES = [f"127.0.0.{n}" for n in range(2, 7)]  # 5 addresses x 10 000 ports
FLOOD_PORTS = range(20_000, 32_000)  # spare ports for any that are taken
FLOOD_RATE = 12_000  # datagrams per second: fast, but within what the socket buffer absorbs
LEGIT_SECONDS = 10.0
#: RSS the server may grow by while it holds 2 000 streams and refuses 48 000 more sources (each
#: admitted stream is a tap, a timeline and an open WAV). Measured: about 36 MiB.
RSS_GROWTH_LIMIT = 100 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rtp(seq: int, ts: int, payload: bytes, ssrc: int) -> bytes:
    return RtpPacket(0, False, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, payload).serialize()


class LegitSender(threading.Thread):
    """One real-time 20 ms PCMU stream from 127.0.0.1."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.packets = int(LEGIT_SECONDS * 50)
        self.audio = payload_for(7, 160 * self.packets, seed=42)
        self.sent = 0

    @property
    def name_on_disk(self) -> str:
        return f"rtp-127.0.0.1-{self.sock.getsockname()[1]}"

    def run(self) -> None:
        start = time.perf_counter()
        for n in range(self.packets):
            delay = start + n * 0.02 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # pacing: real time, a packet every 20 ms
            payload = self.audio[n * 160 : (n + 1) * 160]
            self.sock.sendto(
                rtp(1000 + n, 5000 + 160 * n, payload, 0x1E617), ("127.0.0.1", self.port)
            )
            self.sent += 1


def flood(port: int) -> tuple[int, set[tuple[str, int]]]:
    """One valid RTP packet from each of FLOOD_SOURCES distinct (address, port) pairs, paced."""
    payload = bytes(range(160))
    sources: set[tuple[str, int]] = set()
    start = time.perf_counter()
    for address in FLOOD_ADDRESSES:
        per_address = 0
        for source_port in FLOOD_PORTS:
            if per_address == FLOOD_SOURCES // len(FLOOD_ADDRESSES):
                break
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                try:
                    sock.bind((address, source_port))
                except OSError:
                    continue  # in use: take the next port
                sock.sendto(rtp(len(sources), 0, payload, len(sources)), ("127.0.0.1", port))
            sources.add((address, source_port))
            per_address += 1
            ahead = start + len(sources) / FLOOD_RATE - time.perf_counter()
            if ahead > 0.005:
                time.sleep(ahead)  # pacing: FLOOD_RATE datagrams per second
    return len(sources), sources


def kernel_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket on 127.0.0.1:`port` (its receive buffer
    was full): the last column of its line in /proc/net/udp."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local:
            return int(fields[-1])
    raise AssertionError(f"no UDP socket on 127.0.0.1:{port}")


class Watcher(threading.Thread):
    """Samples /healthz and the server's RSS while the flood runs (a sample every 0.1 s at most;
    /healthz may take seconds to answer on a busy machine, which is not a failure)."""

    def __init__(self, server: ServerProcess, pid: int, baseline: int) -> None:
        super().__init__(daemon=True)
        self.server, self.pid = server, pid
        self.done = threading.Event()
        self.peak_rss, self.peak_active, self.answers = baseline, 0, 0
        self.slowest = 0.0

    def run(self) -> None:
        while not self.done.is_set():
            asked = time.perf_counter()
            health = self.server.health(timeout=60)
            self.slowest = max(self.slowest, time.perf_counter() - asked)
            if health is not None:
                self.answers += 1
                self.peak_active = max(self.peak_active, health["rtp"]["active_streams"])
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            self.done.wait(0.1)  # the sampling period (ends at once when the flood is over)


def test_rtp_flood_from_50000_sources(make_server: Any) -> None:
    server: ServerProcess = make_server(
        "--no-auth",
        "--rtp-max-streams", str(MAX_STREAMS),
        "--rtp-idle-timeout", "60",  # nothing ends during the test: the cap stays full
        "--shutdown-timeout", "30",
    )  # fmt: skip
    assert server.proc is not None
    pid = server.proc.pid
    health = server.health()
    assert health is not None
    # The server may lower the cap to what its open-file limit allows (each stream has a file).
    cap = health.get("limits", {}).get("rtp_max_streams", MAX_STREAMS)
    assert 500 <= cap <= MAX_STREAMS, cap
    baseline = rss_bytes(pid)

    legit = LegitSender(server.rtp_port)
    legit.start()
    # the legitimate stream holds its slot before the flood fills the cap
    wait_for_health(server, lambda h: h["rtp"]["active_streams"] == 1, "the legitimate stream")

    watcher = Watcher(server, pid, baseline)
    watcher.start()
    started = time.perf_counter()
    sent, _ = flood(server.rtp_port)
    flood_seconds = time.perf_counter() - started
    legit.join()
    watcher.done.set()
    watcher.join()
    assert sent == FLOOD_SOURCES
    assert legit.sent == legit.packets

    # The server survived and still answers; it has read every datagram the kernel did not drop
    # (a receive buffer that overflowed while the machine was busy: counted, not hidden).
    def caught_up() -> dict[str, Any] | None:
        assert server.proc is not None and server.proc.poll() is None, server.log()
        health = server.health(timeout=60)
        if health is None:
            return None
        dropped = kernel_drops(server.rtp_port)
        return health if health["rtp"]["datagrams"] + dropped == sent + legit.sent else None

    health = wait_until(caught_up, "the server to answer and to have read the whole flood")
    rtp_stats = health["rtp"]
    dropped = kernel_drops(server.rtp_port)
    flood_read = rtp_stats["datagrams"] - legit.sent  # the legitimate stream lost nothing: below
    # Every flood source that reached the server (one datagram each) either holds a stream or
    # was refused, and counted once: by the cap, or shed while the server was overloaded.
    active = rtp_stats["active_streams"]
    assert 1 <= active <= cap
    assert rtp_stats["streams_refused"] == flood_read - (active - 1), (rtp_stats, dropped)
    assert (
        rtp_stats.get("refused_capacity", 0) + rtp_stats.get("refused_overload", 0)
        == (rtp_stats["streams_refused"])
    )
    assert rtp_stats["internal_errors"] == 0
    assert watcher.peak_active <= cap
    peak_rss = max(watcher.peak_rss, rss_bytes(pid))
    assert peak_rss - baseline < RSS_GROWTH_LIMIT, (peak_rss - baseline) / 2**20
    print(
        f"\nflood: {FLOOD_SOURCES} sources in {flood_seconds:.1f} s "
        f"({FLOOD_SOURCES / flood_seconds:.0f}/s), {dropped} dropped by the kernel; RSS "
        f"{baseline / 2**20:.0f} -> {peak_rss / 2**20:.0f} MiB; {watcher.answers} /healthz "
        f"answers during it, the slowest in {watcher.slowest * 1000:.0f} ms"
    )

    assert server.stop() == 0
    samples, _ = read_wav(server.recordings / f"{legit.name_on_disk}.wav")
    sidecar = wait_for_sidecar(server.recordings, legit.name_on_disk)
    assert np.array_equal(samples, reference.decode("PCMU", legit.audio))
    assert sidecar["rtp"]["lost"] == sidecar["rtp"]["late"] == 0
    assert sidecar["rtp"]["received"] == legit.packets

    # Every admitted flood stream is a finished recording with a true header; nothing else is.
    sidecars = sorted(server.recordings.glob("rtp-*.json"))
    assert len(sidecars) == active
    for path in sidecars:
        assert assert_header_matches_data(path.with_suffix(".wav")) in (160, legit.packets * 160)
        assert '"state": "finished"' in path.read_text()
    assert "Traceback" not in server.log()
