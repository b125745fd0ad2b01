"""`--workers N`: several processes share the HTTP and RTP ports (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections import Counter
from typing import Any

import aiohttp
import numpy as np

from bench.rtp_load import payload_for
from tests import reference
from tests.helpers import (
    ROOT,
    assert_header_matches_data,
    read_wav,
    wait_for_sidecar,
    wait_until,
    wav_frames,
)


def _finished_sidecars(server: Any, pattern: str, count: int) -> list[Any]:
    """Wait until at least `count` recordings matching `pattern` exist, all finished."""

    def finished() -> list[Any]:
        sidecars = []
        for path in server.recordings.glob(pattern):
            try:
                sidecars.append(json.loads(path.read_text()))
            except ValueError:  # being replaced right now
                return []
        done = len(sidecars) >= count and all(s["state"] == "finished" for s in sidecars)
        return sidecars if done else []

    return wait_until(finished, f"{count} finished recordings {pattern}")


def test_rtp_sources_each_land_on_one_worker_and_are_exact(make_server: Any) -> None:
    server = make_server("--no-auth", "--workers", "2", "--rtp-idle-timeout", "1")
    streams, seconds = 60, 3
    result = subprocess.run(
        [sys.executable, "-m", "bench.rtp_load", "--port", str(server.rtp_port),
         "--streams", str(streams), "--seconds", str(seconds), "--seed", "5",
         "--processes", "2", "--ramp", "0.5"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["packets_sent"] == streams * seconds * 50
    sidecars = _finished_sidecars(server, "rtp-*.json", streams)
    # One tap per source: a stream that split across workers would make two files.
    assert len(sidecars) == streams, server.log()
    per_worker = Counter(s["worker"] for s in sidecars)
    assert set(per_worker) == {0, 1}, per_worker  # 60 sources: both workers get some
    by_ssrc = {s["rtp"]["ssrcs"][0]: s for s in sidecars}
    assert len(by_ssrc) == streams
    for index in range(streams):
        sidecar = by_ssrc[f"0x{0x10000000 + index:08x}"]
        assert sidecar["state"] == "finished"
        assert sidecar["rtp"]["received"] == seconds * 50
        assert sidecar["rtp"]["lost"] == sidecar["rtp"]["late"] == 0
        assert sidecar["frames_written"] == seconds * 8000
        path = server.recordings / sidecar["file"]
        assert_header_matches_data(path)
        samples, _ = read_wav(path)
        expected = reference.decode("PCMU", payload_for(index, seconds * 8000, 5))
        assert np.array_equal(samples, expected), index
    # The log says which worker recorded each tap, too.
    log = server.log()
    assert "receiver.taps[0]" in log and "receiver.taps[1]" in log
    assert server.stop() == 0


def recording_everywhere(server: Any) -> bool:
    wavs = [server.recordings / f"ws-worker-{i}.wav" for i in range(8)]
    if not all(wav_frames(wav) == 160 for wav in wavs):
        return False
    rtp = list(server.recordings.glob("rtp-*.wav"))
    return len(rtp) == 20 and all(wav_frames(wav) for wav in rtp)


async def _open_ws_taps(url: str, count: int) -> tuple[aiohttp.ClientSession, list[Any]]:
    session = aiohttp.ClientSession()
    sockets = [await session.ws_connect(f"{url}/tap/ws-worker-{i}") for i in range(count)]
    for ws in sockets:
        await ws.send_bytes(bytes(range(160)))
    return session, sockets


def test_sigterm_to_the_parent_finalizes_every_workers_taps(make_server: Any) -> None:
    server = make_server("--no-auth", "--workers", "2", "--rtp-idle-timeout", "30")
    health = server.health()
    assert health is not None and health["worker"] in (0, 1)
    sender = subprocess.Popen(
        [sys.executable, "-m", "bench.rtp_load", "--port", str(server.rtp_port),
         "--streams", "20", "--seconds", "10", "--seed", "3"],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip

    async def scenario() -> int:
        session, sockets = await _open_ws_taps(server.ws_url, 8)
        # Every tap under way, whichever worker has it (the API answers for one worker only):
        # each WebSocket tap's 160 frames and some audio of every RTP stream are on disk.
        await asyncio.to_thread(wait_until, lambda: recording_everywhere(server), "every tap")
        code = await asyncio.get_running_loop().run_in_executor(None, server.stop)
        closes = [await ws.receive() for ws in sockets]
        assert all(msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                   for msg in closes)  # fmt: skip
        await session.close()
        return code

    try:
        code = asyncio.run(scenario())
    finally:
        sender.kill()
        sender.wait()
    assert code == 0, server.log()
    rtp = _finished_sidecars(server, "rtp-*.json", 20)
    assert len(rtp) == 20 and all(s["end_reason"] == "shutdown" for s in rtp), sorted(
        (s["file"], s["end_reason"], s.get("worker"), s.get("started_at")) for s in rtp
    )
    ws = [wait_for_sidecar(server.recordings, f"ws-worker-{i}") for i in range(8)]
    assert all(s["frames_written"] == 160 for s in ws)
    assert {s["worker"] for s in rtp + ws} == {0, 1}
    assert not list(server.recordings.glob("*.1.json"))  # no clashing names


def test_a_port_in_use_is_reported_once_by_the_parent(make_server: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        server = make_server("--no-auth", "--workers", "2", start=False)
        taken.bind(("127.0.0.1", server.rtp_port))
        result = subprocess.run(server.args, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("rtp_port") == 1, result.stderr
