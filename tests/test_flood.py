"""An RTP flood from 50 000 distinct sources against a server capped at 2 000 streams: the cap
holds, refusals are counted, memory stays bounded, /healthz keeps answering, and a legitimate
stream that started before the flood is recorded sample for sample."""

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
from tests.helpers import ServerProcess, assert_header_matches_data, read_wav, wait_for_sidecar

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
                time.sleep(delay)
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
                time.sleep(ahead)
    return len(sources), sources


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
    time.sleep(0.5)
    baseline = rss_bytes(pid)

    legit = LegitSender(server.rtp_port)
    legit.start()
    time.sleep(0.5)  # the legitimate stream holds its slot before the flood fills the cap

    peak = {"rss": baseline, "active": 0, "health_seconds": 0.0, "answers": 0}
    flooding = threading.Event()
    flooding.set()

    def watch() -> None:
        while flooding.is_set():
            asked = time.perf_counter()
            health = server.health()
            peak["health_seconds"] = max(peak["health_seconds"], time.perf_counter() - asked)
            assert health is not None, "the server stopped answering /healthz"
            peak["answers"] += 1
            peak["active"] = max(peak["active"], health["rtp"]["active_streams"])
            peak["rss"] = max(peak["rss"], rss_bytes(pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    sent, _ = flood(server.rtp_port)
    flood_seconds = time.perf_counter() - started
    legit.join()
    time.sleep(0.5)
    flooding.clear()
    watcher.join()

    assert sent == FLOOD_SOURCES
    health = server.health()
    assert health is not None
    rtp_stats = health["rtp"]
    # Every datagram reached the server (no kernel drops at this rate), so the counts are exact:
    # the legitimate stream plus 1 999 flood sources hold the cap, every other source is refused.
    assert rtp_stats["datagrams"] == FLOOD_SOURCES + legit.sent, rtp_stats
    assert rtp_stats["active_streams"] == cap
    assert rtp_stats["streams_refused"] == FLOOD_SOURCES - (cap - 1)
    assert rtp_stats["internal_errors"] == 0
    assert peak["active"] <= cap
    assert peak["answers"] >= flood_seconds * 3  # /healthz kept answering through the flood
    assert peak["health_seconds"] < 1.0, peak
    assert peak["rss"] - baseline < RSS_GROWTH_LIMIT, (peak["rss"] - baseline) / 2**20
    print(
        f"\nflood: {FLOOD_SOURCES} sources in {flood_seconds:.1f} s "
        f"({FLOOD_SOURCES / flood_seconds:.0f}/s); RSS {baseline / 2**20:.0f} -> "
        f"{peak['rss'] / 2**20:.0f} MiB; slowest /healthz {peak['health_seconds'] * 1000:.0f} ms"
    )

    assert server.stop() == 0
    samples, _ = read_wav(server.recordings / f"{legit.name_on_disk}.wav")
    sidecar = wait_for_sidecar(server.recordings, legit.name_on_disk)
    assert np.array_equal(samples, reference.decode("PCMU", legit.audio))
    assert sidecar["rtp"]["lost"] == sidecar["rtp"]["late"] == 0
    assert sidecar["rtp"]["received"] == legit.packets

    # Every admitted flood stream is a finished recording with a true header; nothing else is.
    sidecars = sorted(server.recordings.glob("rtp-*.json"))
    assert len(sidecars) == cap
    for path in sidecars:
        assert assert_header_matches_data(path.with_suffix(".wav")) in (160, legit.packets * 160)
        assert '"state": "finished"' in path.read_text()
    assert "Traceback" not in server.log()
